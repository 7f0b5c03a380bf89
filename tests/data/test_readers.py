"""`prepare` on Parquet, zstd/gzip JSON lines, Arrow files and `datasets` folders: the same bytes as the
JSONL twin (real tokenizers and corpora, workers 1 and 2, pieces small enough that splitting happens), and
errors that name the file and row, line or what broke."""

from __future__ import annotations

import gzip
import multiprocessing
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from moe_recipes.data import prepare as prep
from moe_recipes.data.prepare import prepare_dataset
from moe_recipes.data.readers import detect_format

from .test_prepare import TOKENIZER_DIRS, corpus_texts, files_in, jsonl, write_lines

TOK = str(TOKENIZER_DIRS["deepseek"])


@pytest.fixture
def small_pieces(monkeypatch) -> None:
    """Many pieces per file, so that row groups, batches and lines are split across workers."""
    monkeypatch.setattr(prep, "MIN_CHUNK_BYTES", 4096)
    monkeypatch.setattr(prep, "MAX_CHUNK_BYTES", 4096)


def fineweb_table(texts: list[str | None]) -> pa.Table:
    """Shaped like a FineWeb shard: the text column among id, dump, url, language_score, token_count."""
    n = len(texts)
    return pa.table(
        {
            "text": pa.array(texts, pa.string()),
            "id": [f"<urn:uuid:{i:08d}>" for i in range(n)],
            "dump": ["CC-MAIN-2024-10"] * n,
            "url": [f"https://example.org/{i}" for i in range(n)],
            "date": ["2024-02-20T10:00:00Z"] * n,
            "language": ["en"] * n,
            "language_score": [0.5 + i / (2 * n) for i in range(n)],
            "token_count": list(range(n)),
        }
    )


def write_parquet(path: Path, table: pa.Table, row_group_size: int = 7, **kwargs) -> Path:
    pq.write_table(table, path, row_group_size=row_group_size, **kwargs)
    return path


def write_zstd(path: Path, lines: list[str | bytes], frames: int = 2) -> Path:
    """JSON lines as a zstd file of several frames (as `zstd a b > c` or a streaming writer leaves them)."""
    data = b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines)
    cut = [len(data) * i // frames for i in range(frames + 1)]
    compressor = zstandard.ZstdCompressor(level=3, write_checksum=True)  # as the zstd command does
    path.write_bytes(b"".join(compressor.compress(data[a:b]) for a, b in zip(cut, cut[1:])))
    return path


def write_dataset_folder(path: Path, texts: list[str]) -> Path:
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"id": list(range(len(texts))), "text": texts})
    ds.save_to_disk(str(path), num_shards=2)
    return path


def output_bytes(prefix: Path) -> tuple[bytes, bytes]:
    return tuple(Path(f"{prefix}_text_document{s}").read_bytes() for s in (".bin", ".idx"))  # type: ignore[return-value]


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return corpus_texts("en", 40) + corpus_texts("ja", 40) + [""]  # an empty document is skipped alike


@pytest.fixture(scope="module")
def twin(tmp_path_factory, texts: list[str]) -> tuple[bytes, bytes]:
    """The JSONL path's output for the documents every format test holds."""
    folder = tmp_path_factory.mktemp("twin")
    src = write_lines(folder / "docs.jsonl", jsonl(texts))
    prepare_dataset([str(src)], TOK, str(folder / "jsonl"), append_eod=True)
    return output_bytes(folder / "jsonl")


def make_input(kind: str, folder: Path, texts: list[str]) -> Path:
    if kind == "parquet":
        return write_parquet(folder / "docs.parquet", fineweb_table(texts))
    if kind == "jsonl.zst":
        return write_zstd(folder / "docs.jsonl.zst", jsonl(texts))
    if kind == "json.gz":
        return write_lines(folder / "docs.json.gz", jsonl(texts))
    if kind == "arrow-file":
        path = folder / "docs.arrow"
        with pa.ipc.new_file(path, fineweb_table(texts).schema) as writer:
            writer.write_table(fineweb_table(texts), max_chunksize=9)
        return path
    return write_dataset_folder(folder / "docs_dataset", texts)


KINDS = ["parquet", "jsonl.zst", "json.gz", "datasets", "arrow-file"]


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("kind", KINDS)
def test_format_gives_the_bytes_of_its_jsonl_twin(
    tmp_path: Path, small_pieces, texts: list[str], twin: tuple[bytes, bytes], kind: str, workers: int
) -> None:
    src = make_input(kind, tmp_path, texts)
    stats = prepare_dataset([str(src)], TOK, str(tmp_path / "o"), append_eod=True, workers=workers)
    assert output_bytes(tmp_path / "o") == twin
    assert stats.documents == len(texts) - 1 and stats.empty_documents == 1
    assert sum(f.documents for f in stats.files) == stats.documents
    assert multiprocessing.active_children() == []


def test_formats_mixed_in_one_input_list(tmp_path: Path, small_pieces, texts: list[str]) -> None:
    """Every format in one --input list (a glob among them) = the JSONL of all documents in that order."""
    parts = [texts[:20], texts[20:45], texts[45:60], texts[60:]]
    (tmp_path / "pq").mkdir()
    inputs = [
        str(write_parquet(tmp_path / "pq" / "a.parquet", fineweb_table(parts[0]), row_group_size=3)),
        str(write_zstd(tmp_path / "b.jsonl.zst", jsonl(parts[1]))),
        str(write_dataset_folder(tmp_path / "c_ds", parts[2])),
        str(tmp_path / "d*.jsonl"),
    ]
    write_lines(tmp_path / "d.jsonl", jsonl(parts[3]))
    inputs[0] = str(tmp_path / "pq" / "*.parquet")
    write_lines(tmp_path / "all.jsonl", jsonl(texts))
    prepare_dataset([str(tmp_path / "all.jsonl")], TOK, str(tmp_path / "want"), append_eod=True)
    stats = prepare_dataset(inputs, TOK, str(tmp_path / "got"), append_eod=True, workers=2)
    assert output_bytes(tmp_path / "got") == output_bytes(tmp_path / "want")
    arrow_files = sorted(str(p) for p in (tmp_path / "c_ds").glob("data-*.arrow"))
    assert stats.inputs == [str(tmp_path / "pq" / "a.parquet"), str(tmp_path / "b.jsonl.zst"),
                            *arrow_files, str(tmp_path / "d.jsonl")]  # fmt: skip
    per_file = [f.documents for f in stats.files]
    assert (
        per_file[:2] == [20, 25] and sum(per_file[2:4]) == 15 and per_file[4] == 20
    )  # texts[60:] ends with ""
    summary = stats.summary()
    assert re.search(rf"^ +20 +{stats.files[0].tokens} +0  {re.escape(stats.inputs[0])}$", summary, re.M)
    assert re.search(rf"^ +20 +\d+ +1  {re.escape(stats.inputs[-1])}$", summary, re.M)


def test_one_parquet_file_is_split_by_row_groups(tmp_path: Path, small_pieces, texts: list[str]) -> None:
    src = write_parquet(tmp_path / "big.parquet", fineweb_table(texts), row_group_size=5)
    pieces = list(prep.iter_pieces([src], 4096))
    assert len(pieces) > 4 and [p.kind for p in pieces] == ["parquet"] * len(pieces)
    assert [p.start for p in pieces[1:]] == [p.end for p in pieces[:-1]] and pieces[-1].end == 17
    assert [p.first_row for p in pieces] == [5 * p.start for p in pieces]
    assert sum(p.size for p in pieces) == src.stat().st_size  # the progress bar ends at 100%


def test_detect_format_reads_the_magic_not_the_name(tmp_path: Path, texts: list[str]) -> None:
    write_parquet(tmp_path / "a.jsonl", fineweb_table(texts[:3]))
    write_zstd(tmp_path / "b.parquet", jsonl(texts[:3]))
    (tmp_path / "c.gz").write_text("\n".join(jsonl(texts[:3])))
    (tmp_path / "d.zst").write_bytes(gzip.compress(b""))
    got = [detect_format(tmp_path / n) for n in ("a.jsonl", "b.parquet", "c.gz", "d.zst")]
    assert got == ["parquet", "zstd", "jsonl", "gzip"]


# ----------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------


def numbered(count: int) -> list[str]:
    return [f"document number {i} has a few words in it." for i in range(count)]


def expect_error(tmp_path: Path, src: Path, message: str, workers: int = 2) -> None:
    with pytest.raises(ValueError, match=message):
        prepare_dataset([str(src)], TOK, str(tmp_path / "o"), workers=workers)
    assert not [f for f in files_in(tmp_path) if f.startswith("o_")]
    assert multiprocessing.active_children() == []


BAD_PARQUET_ROWS = [
    (pa.table({"id": [1, 2], "body": ["a", "b"]}), 1, "missing column 'text' (columns: id, body)"),
    (pa.table({"text": pa.array(range(50), pa.int64())}), 1, "value of 'text' is int64, not a string"),
    (fineweb_table([*numbered(22), None, *numbered(20)]), 23, "value of 'text' is null, not a string"),
    (
        pa.table(
            {
                "text": pa.array([s.encode() for s in numbered(30)] + [b"\xff bad"], pa.binary()).view(
                    pa.string()
                )
            }
        ),
        31,
        "invalid UTF-8 in 'text'",
    ),
]


@pytest.mark.parametrize(("table", "row", "reason"), BAD_PARQUET_ROWS, ids=["column", "int", "null", "utf8"])
def test_bad_parquet_row_names_file_and_row(
    tmp_path: Path, small_pieces, table, row: int, reason: str
) -> None:
    src = write_parquet(tmp_path / "in.parquet", table, row_group_size=4)
    expect_error(tmp_path, src, re.escape(f"{src}, row {row}: {reason}") + ".*--skip-bad-lines")


def test_skip_bad_rows_counts_them_per_file(tmp_path: Path, small_pieces, texts: list[str]) -> None:
    rows = list(texts[:30])
    rows[4] = None
    rows[17] = None
    bad = write_parquet(tmp_path / "bad.parquet", fineweb_table(rows))
    good = write_lines(tmp_path / "good.jsonl", jsonl(texts[30:40]))
    stats = prepare_dataset([str(bad), str(good)], TOK, str(tmp_path / "o"), skip_bad_lines=True, workers=2)
    assert (stats.bad_lines, stats.documents) == (2, 38)
    assert [(f.documents, f.skipped) for f in stats.files] == [(28, 2), (10, 0)]
    kept = [t for i, t in enumerate(texts[:40]) if i not in (4, 17)]
    write_lines(tmp_path / "want.jsonl", jsonl(kept))
    prepare_dataset([str(tmp_path / "want.jsonl")], TOK, str(tmp_path / "w"))
    assert output_bytes(tmp_path / "o") == output_bytes(tmp_path / "w")


def test_bad_line_in_zstd_file_names_its_line(tmp_path: Path, small_pieces) -> None:
    lines = jsonl(numbered(300))
    lines[211] = '{"text": 7}'
    src = write_zstd(tmp_path / "in.jsonl.zst", lines, frames=3)
    expect_error(tmp_path, src, re.escape(f"{src}, line 212: value of 'text' is int, not a string"))


def test_truncated_and_corrupt_zstd(tmp_path: Path, small_pieces) -> None:
    whole = write_zstd(tmp_path / "in.jsonl.zst", jsonl(numbered(2000)), frames=1).read_bytes()
    (tmp_path / "in.jsonl.zst").write_bytes(whole[: len(whole) // 2])
    expect_error(tmp_path, tmp_path / "in.jsonl.zst", r"in\.jsonl\.zst, after line \d+: truncated zstd data")
    (tmp_path / "in.jsonl.zst").write_bytes(whole[:4] + b"\xff" * 8 + whole[12:])  # a broken frame header
    expect_error(tmp_path, tmp_path / "in.jsonl.zst", r"in\.jsonl\.zst, after line 0: corrupt zstd data")


def test_truncated_gzip(tmp_path: Path, small_pieces) -> None:
    whole = gzip.compress("\n".join(jsonl(numbered(2000))).encode())
    (tmp_path / "in.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    expect_error(
        tmp_path, tmp_path / "in.jsonl.gz", r"in\.jsonl\.gz, after line \d+: corrupt or truncated gzip"
    )


def test_truncated_and_corrupt_parquet(tmp_path: Path, small_pieces, texts: list[str]) -> None:
    src = write_parquet(tmp_path / "in.parquet", fineweb_table(texts), write_page_checksum=True)
    whole = src.read_bytes()
    src.write_bytes(whole[:-100])
    expect_error(tmp_path, src, re.escape(f"{src}: not a readable Parquet file"))
    # Zero the text column's pages in row group 6 (rows 43-49); the footer stays intact.
    src.write_bytes(whole)
    chunk = pq.ParquetFile(src).metadata.row_group(6).column(0)
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    src.write_bytes(
        whole[:start] + b"\x00" * chunk.total_compressed_size + whole[start + chunk.total_compressed_size :]
    )
    expect_error(tmp_path, src, re.escape(f"{src} (row groups ") + r"\d+-\d+\): corrupt or truncated data")


def test_missing_dataset_file_and_plain_folder(tmp_path: Path, texts: list[str]) -> None:
    folder = write_dataset_folder(tmp_path / "ds", texts[:10])
    (tmp_path / "plain").mkdir()
    with pytest.raises(FileNotFoundError, match="folder without a datasets state.json"):
        prepare_dataset([str(tmp_path / "plain")], TOK, str(tmp_path / "o"))
    next(folder.glob("data-*.arrow")).unlink()
    with pytest.raises(FileNotFoundError, match="state.json lists missing data file"):
        prepare_dataset([str(folder)], TOK, str(tmp_path / "o"))


def test_pieces_are_sized_by_decompressed_bytes(tmp_path: Path, texts: list[str]) -> None:
    """Compressed inputs are cut as finely as their plain twin, not by their (smaller) file size."""
    from moe_recipes.data.readers import text_bytes

    plain = write_lines(tmp_path / "a.jsonl", jsonl(texts))
    size = plain.stat().st_size
    one_frame = write_zstd(tmp_path / "a.jsonl.zst", jsonl(texts), frames=1)
    gz = write_lines(tmp_path / "a.jsonl.gz", jsonl(texts))
    assert [text_bytes(p) for p in (plain, one_frame, gz)] == [size, size, size]
    counts = [len(list(prep.iter_pieces([p], size // 8))) for p in (plain, one_frame, gz)]
    assert counts[0] >= 6 and counts == [counts[0]] * 3  # the same lines in each piece
    several = write_zstd(tmp_path / "b.jsonl.zst", jsonl(texts), frames=3)
    assert size // 3 - 100 < text_bytes(several) < size  # the first frame's size: a lower bound
    parquet = write_parquet(tmp_path / "a.parquet", fineweb_table(texts))
    assert size // 2 < text_bytes(parquet) < 3 * size  # the text column dominates the row groups
