"""Document readers for `prepare`: JSON lines (plain, gzip, zstd), Parquet and `datasets` Arrow folders.

The format of an input is detected from its first bytes, never from its name:

* `PAR1` -> Parquet; the text column is read row group by row group (other columns are never read);
* `ARROW1` -> an Arrow IPC file; `0xFFFFFFFF` -> an Arrow IPC stream (what `datasets`' `save_to_disk` writes
  as `data-*.arrow`); a folder holding `state.json` is a `datasets` folder and stands for its Arrow files,
  in the order `state.json` lists them;
* gzip (`1f 8b`) or zstd (`28 b5 2f fd`) magic -> compressed JSON lines; anything else -> plain JSON lines.

Every input is cut into `Piece`s, the unit of work of one worker, in input order:

* plain JSON lines: byte ranges ending at a line end, read by the worker itself;
* compressed JSON lines: the parent decompresses the stream (it cannot be seeked) and hands whole lines;
* Parquet: runs of consecutive row groups; Arrow: runs of consecutive record batches (a memory map, so a
  worker skips the batches before its own without reading their data).

So one large Parquet file keeps every worker busy, and what is in memory is a few pieces per worker.

`read_piece` turns a piece into texts plus bookkeeping: rows (or lines), blank lines, and the bad ones as
(1-based number within the piece, reason). A row is bad when its JSON is invalid (or not UTF-8), it is not
an object, the key (column) is missing, or the value is null or not a string. A corrupt or truncated
compressed stream or Parquet/Arrow file raises ValueError naming the file and where it broke.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

PieceKind = Literal["lines", "parquet", "arrow"]
MAX_REPORTED_BAD = 5
READ_BLOCK = 1 << 20  # decompressed bytes read at a time from gzip
ZSTD_READ_BLOCK = 1 << 16  # compressed bytes fed to zstd at a time (text expands ~5-30x)

_MAGICS: tuple[tuple[bytes, str], ...] = (
    (b"PAR1", "parquet"),
    (b"ARROW1", "arrow-file"),
    (b"\xff\xff\xff\xff", "arrow-stream"),
    (b"\x1f\x8b", "gzip"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
)


def detect_format(path: str | Path) -> str:
    """One of parquet, arrow-file, arrow-stream, gzip, zstd (JSON lines inside) or jsonl, from the magic."""
    with open(path, "rb") as f:
        head = f.read(8)
    for magic, name in _MAGICS:
        if head.startswith(magic):
            return name
    return "jsonl"


def text_bytes(path: Path) -> int:
    """About how many bytes of records `path` holds once decompressed: sizes pieces the same whatever the
    compression. Read from the file's own metadata (gzip's ISIZE trailer, zstd's frame header, Parquet's
    row-group sizes); 4x the file size where it says nothing."""
    fmt, size = detect_format(path), path.stat().st_size
    if fmt == "gzip" and size >= 18:
        with open(path, "rb") as f:
            f.seek(-4, 2)
            isize = int.from_bytes(f.read(4), "little")  # modulo 2**32
        return isize if isize >= size else 4 * size
    if fmt == "zstd":
        import zstandard

        with open(path, "rb") as f:
            head = f.read(18)
        try:
            content = zstandard.frame_content_size(head)
        except zstandard.ZstdError:
            content = -1
        return content if content >= size else 4 * size  # the first frame's size (a lower bound), or a guess
    if fmt == "parquet":
        meta = open_parquet(path).metadata
        return sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    return size


def dataset_folder_files(folder: Path) -> list[Path]:
    """The Arrow files of a `datasets.save_to_disk` folder, in the order its state.json lists them."""
    state_file = folder / "state.json"
    try:
        state = json.loads(state_file.read_text())
        names = [entry["filename"] for entry in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{state_file}: not a datasets state.json with '_data_files' ({err})") from None
    files = [folder / name for name in names]
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: state.json lists missing data file(s): {', '.join(missing)}")
    return files


def is_dataset_folder(path: Path) -> bool:
    return path.is_dir() and (path / "state.json").is_file()


@dataclass(frozen=True)
class Piece:
    """A run of whole records of one input file.

    lines: bytes [start, end) of a plain file, or `data` (decompressed lines) of a compressed one.
    parquet / arrow: row groups / record batches [start, end), whose first row is `first_row` (0-based).
    `size` is how many bytes of the input file the piece accounts for (the progress bar's unit).
    """

    path: str
    file_index: int
    kind: PieceKind = "lines"
    start: int = 0
    end: int = 0
    first_row: int = 0
    size: int = 0
    data: bytes | None = None

    def describe(self) -> str:
        if self.kind == "lines":
            return self.path if self.data is not None else f"{self.path} (bytes {self.start}-{self.end})"
        unit = "row groups" if self.kind == "parquet" else "record batches"
        return f"{self.path} ({unit} {self.start}-{self.end - 1})"


@dataclass
class PieceRecords:
    """What a piece held besides its texts: counts and the first few bad records."""

    records: int = 0  # lines (JSON lines, blank ones included) or rows
    blank_lines: int = 0
    bad: list[tuple[int, str]] = field(default_factory=list)  # (1-based number within the piece, reason)
    bad_count: int = 0

    def add_bad(self, number: int, reason: str) -> None:
        self.bad_count += 1
        if len(self.bad) < MAX_REPORTED_BAD:
            self.bad.append((number, reason))


# ----------------------------------------------------------------------------------------------------------
# Planning: input files -> pieces
# ----------------------------------------------------------------------------------------------------------


def iter_pieces(files: list[Path], chunk_bytes: int) -> Iterator[Piece]:
    """Cut every input into pieces of about `chunk_bytes` bytes of text, in input order."""
    for index, path in enumerate(files):
        fmt = detect_format(path)
        if fmt == "jsonl":
            yield from _plain_pieces(path, index, chunk_bytes)
        elif fmt in ("gzip", "zstd"):
            yield from _compressed_pieces(path, index, fmt, chunk_bytes)
        elif fmt == "parquet":
            yield from _parquet_pieces(path, index, chunk_bytes)
        else:
            yield from _arrow_pieces(path, index, chunk_bytes)


def _plain_pieces(path: Path, index: int, chunk_bytes: int) -> Iterator[Piece]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        start = 0
        while start < size:
            f.seek(min(size, start + chunk_bytes))
            f.readline()  # end the piece at the end of the line the target falls into
            end = f.tell()
            yield Piece(str(path), index, start=start, end=end, size=end - start)
            start = end


def _gzip_blocks(raw: Any, path: Path) -> Iterator[bytes]:
    try:
        with gzip.GzipFile(fileobj=raw, mode="rb") as f:
            while block := f.read(READ_BLOCK):
                yield block
    except (EOFError, OSError, zlib.error) as err:
        raise _StreamError(f"corrupt or truncated gzip data ({err})") from None


def _zstd_blocks(raw: Any, path: Path) -> Iterator[bytes]:
    """Decompress every frame of a zstd file; an unfinished last frame is an error, not silent EOF."""
    import zstandard

    decompressor = zstandard.ZstdDecompressor()
    obj, in_frame = decompressor.decompressobj(), False
    try:
        while block := raw.read(ZSTD_READ_BLOCK):
            while block:
                out = obj.decompress(block)
                in_frame = True
                if out:
                    yield out
                block = b""
                if obj.eof:  # a frame ended: what follows is the next frame
                    block, in_frame = obj.unused_data, False
                    obj = decompressor.decompressobj()
    except zstandard.ZstdError as err:
        raise _StreamError(f"corrupt zstd data ({err})") from None
    if in_frame and not obj.eof:
        raise _StreamError("truncated zstd data (the last frame does not end)")


class _StreamError(ValueError):
    pass


def _compressed_pieces(path: Path, index: int, fmt: str, chunk_bytes: int) -> Iterator[Piece]:
    """Whole lines of a compressed file, about `chunk_bytes` of decompressed text each."""
    blocks_of = _gzip_blocks if fmt == "gzip" else _zstd_blocks
    buffer, lines_done, consumed = bytearray(), 0, 0
    with open(path, "rb") as raw:
        try:
            for block in blocks_of(raw, path):
                buffer += block
                while len(buffer) >= chunk_bytes:
                    # end the piece at the end of the line the target falls into, as for plain files
                    cut = buffer.find(b"\n", chunk_bytes - 1) + 1
                    if cut == 0:
                        break  # that line goes on in the next block
                    data = bytes(buffer[:cut])
                    del buffer[:cut]
                    lines_done += data.count(b"\n")
                    yield Piece(str(path), index, data=data, size=raw.tell() - consumed)
                    consumed = raw.tell()
        except _StreamError as err:
            line = lines_done + buffer.count(b"\n")
            raise ValueError(f"{path}, after line {line}: {err}") from None
        if buffer or consumed < raw.tell():
            yield Piece(str(path), index, data=bytes(buffer), size=raw.tell() - consumed)


_LAST_PARQUET: list[Any] = [
    None,
    None,
]  # ((path, size, mtime), ParquetFile): a worker reads one file's row groups in turn


def open_parquet(path: str | Path) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    st = Path(path).stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if _LAST_PARQUET[0] == key:
        return _LAST_PARQUET[1]
    try:
        # Pages written with CRCs (`write_page_checksum`) are checked: damage becomes an error, not garbage.
        pf = pq.ParquetFile(path, memory_map=True, page_checksum_verification=True)
    except (pa.ArrowException, OSError) as err:
        raise ValueError(f"{path}: not a readable Parquet file ({err})") from None
    _LAST_PARQUET[:] = [key, pf]
    return pf


def _group_runs(sizes: list[int], rows: list[int], chunk_bytes: int) -> Iterator[tuple[int, int, int, int]]:
    """Consecutive runs of units (row groups, batches) of about chunk_bytes: (start, end, first_row, bytes)."""
    start, first_row, row, acc = 0, 0, 0, 0
    for i, (size, count) in enumerate(zip(sizes, rows)):
        acc += size
        row += count
        if acc >= chunk_bytes or i == len(sizes) - 1:
            yield start, i + 1, first_row, acc
            start, first_row, acc = i + 1, row, 0


def _parquet_pieces(path: Path, index: int, chunk_bytes: int) -> Iterator[Piece]:
    meta = open_parquet(path).metadata
    groups = [meta.row_group(i) for i in range(meta.num_row_groups)]
    file_size = path.stat().st_size
    total = sum(g.total_byte_size for g in groups) or 1
    sizes = [g.total_byte_size for g in groups]
    done = 0
    for start, end, first_row, nbytes in _group_runs(sizes, [g.num_rows for g in groups], chunk_bytes):
        share = file_size * (done + nbytes) // total - file_size * done // total
        done += nbytes
        yield Piece(str(path), index, "parquet", start, end, first_row, share)


def open_arrow(path: str | Path) -> Any:
    """A reader over the record batches of an Arrow IPC stream or file, through a memory map."""
    import pyarrow as pa

    source = pa.memory_map(str(path), "r")
    try:
        if detect_format(path) == "arrow-file":
            reader = pa.ipc.open_file(source)
            return [reader.get_batch(i) for i in range(reader.num_record_batches)], reader.schema
        reader = pa.ipc.open_stream(source)
        return reader, reader.schema
    except (pa.ArrowException, OSError) as err:
        raise ValueError(f"{path}: not a readable Arrow IPC file ({err})") from None


def _arrow_batches(path: str | Path) -> Iterator[Any]:
    import pyarrow as pa

    batches, _ = open_arrow(path)
    try:
        yield from batches
    except (pa.ArrowException, OSError) as err:
        raise ValueError(f"{path}: corrupt or truncated Arrow data ({err})") from None


def _arrow_pieces(path: Path, index: int, chunk_bytes: int) -> Iterator[Piece]:
    sizes, rows = [], []
    for batch in _arrow_batches(path):  # memory-mapped: only the batches' metadata is read here
        sizes.append(batch.nbytes)
        rows.append(batch.num_rows)
    file_size, total, done = path.stat().st_size, sum(sizes) or 1, 0
    for start, end, first_row, nbytes in _group_runs(sizes, rows, chunk_bytes):
        share = file_size * (done + nbytes) // total - file_size * done // total
        done += nbytes
        yield Piece(str(path), index, "arrow", start, end, first_row, share)


# ----------------------------------------------------------------------------------------------------------
# Reading: piece -> texts
# ----------------------------------------------------------------------------------------------------------


def json_bad_reason(obj: Any, key: str) -> str | None:
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    if key not in obj:
        return f"missing key {key!r}"
    if not isinstance(obj[key], str):
        return f"value of {key!r} is {type(obj[key]).__name__}, not a string"
    return None


def read_piece(piece: Piece, key: str, stop_at_bad: bool) -> tuple[list[str], PieceRecords]:
    """The texts of a piece's good records, in order; with `stop_at_bad`, reading ends at the first bad one."""
    if piece.kind == "lines":
        return _json_lines(_piece_bytes(piece), key, stop_at_bad)
    values, names = _column(piece, key)
    return _column_texts(values, names, key, stop_at_bad)


def _piece_bytes(piece: Piece) -> bytes:
    if piece.data is not None:
        return piece.data
    with open(piece.path, "rb") as f:
        f.seek(piece.start)
        return f.read(piece.end - piece.start)


def _json_lines(data: bytes, key: str, stop_at_bad: bool) -> tuple[list[str], PieceRecords]:
    lines = data.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()  # the piece after the final newline
    records = PieceRecords(len(lines))
    texts: list[str] = []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            records.blank_lines += 1
            continue
        try:
            obj = json.loads(raw)
        except ValueError as err:  # includes UnicodeDecodeError
            reason: str | None = f"invalid JSON ({err})"
        else:
            reason = json_bad_reason(obj, key)
        if reason is None:
            texts.append(obj[key])
            continue
        records.add_bad(number, reason)
        if stop_at_bad:
            break
    return texts, records


def _column(piece: Piece, key: str) -> tuple[Any, list[str]]:
    """(the key's column over the piece's rows as a ChunkedArray, or the row count when it is missing;
    the file's column names)."""
    import pyarrow as pa

    try:
        if piece.kind == "parquet":
            pf = open_parquet(piece.path)
            names = pf.schema_arrow.names
            groups = list(range(piece.start, piece.end))
            if key not in names:
                return sum(pf.metadata.row_group(i).num_rows for i in groups), names
            # one thread: a worker is one process on one core, like its tokenizer
            return pf.read_row_groups(groups, columns=[key], use_threads=False).column(key), names
        reader, schema = open_arrow(piece.path)
        batches = []
        for i, batch in enumerate(reader):
            if i >= piece.end:
                break
            if i >= piece.start:
                batches.append(batch)
        rows = sum(b.num_rows for b in batches)
        if key not in schema.names:
            return rows, schema.names
        return pa.chunked_array([b.column(key) for b in batches], schema.field(key).type), schema.names
    except (pa.ArrowException, OSError) as err:
        raise ValueError(f"{piece.describe()}: corrupt or truncated data ({err})") from None


def _is_string(dtype: Any) -> bool:
    import pyarrow as pa

    return pa.types.is_string(dtype) or pa.types.is_large_string(dtype) or pa.types.is_string_view(dtype)


def _column_texts(
    column: Any, names: list[str], key: str, stop_at_bad: bool
) -> tuple[list[str], PieceRecords]:
    """Texts of a string column; nulls, non-string columns, a missing column and invalid UTF-8 are bad rows."""
    import pyarrow as pa

    if isinstance(column, int):
        records = PieceRecords(column)
        for number in range(1, column + 1):
            records.add_bad(number, f"missing column {key!r} (columns: {', '.join(names)})")
            if stop_at_bad:
                break
        return [], records
    records = PieceRecords(len(column))
    if not _is_string(column.type):
        for number, value in enumerate(column.to_pylist(), start=1):
            what = "null" if value is None else f"{column.type}"
            records.add_bad(number, f"value of {key!r} is {what}, not a string")
            if stop_at_bad:
                break
        return [], records
    if column.null_count == 0:
        try:
            return column.to_pylist(), records
        except UnicodeDecodeError:
            pass  # find the bad rows one by one below
    texts: list[str] = []
    raw = column.cast(pa.large_binary()).to_pylist()
    for number, value in enumerate(raw, start=1):
        reason = None
        if value is None:
            reason = f"value of {key!r} is null, not a string"
        else:
            try:
                texts.append(value.decode("utf-8"))
            except UnicodeDecodeError as err:
                reason = f"invalid UTF-8 in {key!r} ({err})"
        if reason is not None:
            records.add_bad(number, reason)
            if stop_at_bad:
                break
    return texts, records
