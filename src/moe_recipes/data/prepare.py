"""Tokenize documents (JSON lines, Parquet, Arrow, `datasets` folders) into a Megatron-LM compatible indexed dataset (`moe-recipes prepare`).

Output: `PREFIX_<json_key>_document.bin` (tokens back to back) and `.idx` (MMIDIDX version 1, see
`moe_recipes.data.indexed`), one sequence per document, tokens as uint16 when the vocabulary
(`len(tokenizer)`) has fewer than 65500 ids and int32 otherwise -- the files Megatron-LM's
`tools/preprocess_data.py` writes, readable by its `IndexedDataset`.

Special tokens, the same for every tokenizer:

* The text is encoded with `add_special_tokens=False`, so whatever the tokenizer's post-processor
  would add (Mixtral's adds BOS, DeepSeek's adds nothing) is never added.
* `add_bos=True` (the default) then puts exactly one BOS token in front of every document if the
  tokenizer has a BOS token (none when it has none); `add_bos=False` puts none.
* `append_eod=True` appends the EOS id (`tokenizer.eos_token_id`) to every document.

So a document is `[bos] + tokenizer.encode(text, add_special_tokens=False) + [eos]`, with the
brackets present as chosen.

Input: files in any format `data.readers` detects (JSON lines plain, gzip or zstd, one object per line
with the text under `json_key`; Parquet and Arrow with a `json_key` column), and `datasets` folders
(standing for their Arrow files). Globs are expanded here (sorted per pattern); a pattern or path that
matches nothing is an error. Files are streamed in pieces, never read whole.

* A line (row) that is not valid JSON (or not UTF-8), is not an object, lacks `json_key`, or whose value
  is null or not a string stops the run with ValueError naming the file and 1-based line (row) number;
  with `skip_bad_lines=True` such records are skipped and counted (the first few are reported on stderr).
  A corrupt or truncated compressed stream, Parquet or Arrow file always stops the run.
* Blank (whitespace-only) lines are skipped silently and not counted as bad (trailing newlines and
  blank separators are common in JSONL); they still count for line numbers.
* Documents that encode to zero tokens (e.g. `""`) are skipped and counted; no BOS/EOS-only sequence
  is written for them.

Parallelism: `workers` processes. On Linux they are forked and inherit the parent's ready
tokenizer; elsewhere they are spawned and rebuild it from the fast backend's JSON (importing no
transformers). Workers read their own pieces (`data.readers.Piece`): byte ranges of plain files, runs of
Parquet row groups or Arrow record batches, so no text passes through the parent; compressed streams
cannot be seeked, so the parent decompresses them and passes whole lines. Pieces are sized by the
inputs' decompressed bytes. Each chunk is encoded in one call and returned as numpy arrays: through the exact word cache
of `data.fast_tokenize` where the tokenizer allows it (the longest document of every chunk is
re-encoded with the tokenizer's own pipeline as a check), else with the Rust backend's
`encode_batch_fast`. Every worker -- and the parent when
`workers=1` -- encodes on one thread (TOKENIZERS_PARALLELISM=false), so N workers use N cores.
Results are written in input order whatever the number of workers, so the output is identical.

Atomicity: data goes to `<final name>.tmp-<pid>` files in the output folder and is renamed at the
end (.bin first, .idx last, after removing any old .idx). An exception, Ctrl-C or SIGTERM (turned
into KeyboardInterrupt while `prepare_dataset` runs in the main thread) removes the temporary files,
so no complete-looking .bin/.idx pair is left behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from moe_recipes.data.fast_tokenize import BackendEncoder, BatchEncoder, fast_encoder
from moe_recipes.data.indexed import token_dtype, write_index
from moe_recipes.data.readers import (
    Piece,
    dataset_folder_files,
    is_dataset_folder,
    iter_pieces,
    read_piece,
    text_bytes,
)
from moe_recipes.data.tokenizer import bos_id, eod_id, load_tokenizer
from moe_recipes.fileio import RunLock, is_out_of_space, out_of_space_error

# Chunks are whole lines, about this many bytes; small inputs get smaller chunks so every worker
# has several to do.
MAX_CHUNK_BYTES = 4 << 20
MIN_CHUNK_BYTES = 64 << 10
CHUNKS_PER_WORKER = 8
IN_FLIGHT_PER_WORKER = 3  # chunks queued per worker: bounds memory, keeps workers busy
# Linux: fork, so workers inherit the parent's ready tokenizer (building DeepSeek's 128k-merge BPE
# again costs ~0.4 s of CPU per worker, plus the imports). The child only runs the Rust tokenizer
# and numpy, nothing that depends on the parent's threads. Elsewhere fork is unsafe: spawn.
START_METHOD = "fork" if sys.platform.startswith("linux") else "spawn"
MAX_REPORTED_BAD_LINES = 5


@dataclass
class FileStats:
    """Documents, tokens and skipped records (bad rows or lines, empty documents) of one input file."""

    path: str
    documents: int = 0
    tokens: int = 0
    skipped: int = 0


@dataclass
class PrepareStats:
    """What one `prepare_dataset` run did; `summary()` is what the CLI prints."""

    inputs: list[str]
    bin_path: str
    idx_path: str
    dtype: str
    documents: int = 0
    tokens: int = 0
    bad_lines: int = 0
    empty_documents: int = 0
    blank_lines: int = 0
    seconds: float = 0.0
    files: list[FileStats] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        rows = [
            ("input files", str(len(self.inputs))),
            ("documents", str(self.documents)),
            ("tokens", f"{self.tokens} ({self.dtype})"),
            ("skipped bad lines", str(self.bad_lines)),
            ("skipped empty documents", str(self.empty_documents)),
            ("blank lines (ignored)", str(self.blank_lines)),
            ("seconds", f"{self.seconds:.2f}"),
            ("tokens/s", f"{self.tokens_per_second:,.0f}"),
            ("output", self.bin_path),
            ("", self.idx_path),
        ]
        width = max(len(label) for label, _ in rows) + 2
        text = "\n".join((f"{label}:" if label else "").ljust(width) + value for label, value in rows)
        return text + "\n" + self.files_table()

    def files_table(self) -> str:
        """One line per input file: documents, tokens, skipped records."""
        head = f"{'documents':>12} {'tokens':>14} {'skipped':>9}  input file"
        lines = [f"{f.documents:>12} {f.tokens:>14} {f.skipped:>9}  {f.path}" for f in self.files]
        return "\n".join([head, *lines])


@dataclass
class _PieceResult:
    """Tokens of the chunk's documents (concatenated) plus per-line bookkeeping."""

    tokens: np.ndarray
    lengths: np.ndarray  # int32, one per written document
    lines: int
    blank_lines: int
    empty_documents: int
    bad: list[tuple[int, str]] = field(default_factory=list)  # (1-based record within the piece, reason)
    bad_count: int = 0


@dataclass(frozen=True)
class _EncodeSpec:
    """Everything a worker needs. `tokenizer_json` is the fast backend's serialisation for spawned
    workers; forked workers inherit the parent's tokenizer instead. A worker that has neither loads
    `tokenizer_dir` with transformers (slow tokenizers)."""

    tokenizer_json: str | None
    tokenizer_dir: str
    json_key: str
    bos: int | None
    eos: int | None
    dtype: str
    skip_bad_lines: bool
    word_cache: bool = True


def output_prefix_for(output_prefix: str | os.PathLike, json_key: str) -> str:
    """The dataset prefix Megatron-LM uses: `PREFIX_<json_key>_document`."""
    return f"{output_prefix}_{json_key}_document"


def _is_input(path: Path) -> bool:
    return path.is_file() or is_dataset_folder(path)


def _files_of(path: Path) -> list[Path]:
    """A file stands for itself; a `datasets` folder for its Arrow files."""
    return dataset_folder_files(path) if path.is_dir() else [path]


def expand_inputs(patterns: list[str]) -> list[Path]:
    """Expand files, `datasets` folders and glob patterns (each pattern's matches sorted; order kept).

    FileNotFoundError for a pattern that matches nothing or a path that does not exist.
    """
    if not patterns:
        raise ValueError("no input files given")
    files: list[Path] = []
    for pattern in patterns:
        if any(ch in pattern for ch in "*?["):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if _is_input(Path(p)))
            if not matches:
                raise FileNotFoundError(f"input pattern {pattern!r} matches no file")
            for match in matches:
                files.extend(_files_of(Path(match)))
        else:
            path = Path(pattern)
            if not _is_input(path):
                what = "is a folder without a datasets state.json" if path.is_dir() else "not found"
                raise FileNotFoundError(f"input file {what}: {pattern}")
            files.extend(_files_of(path))
    return files


def _chunk_bytes(total_bytes: int, workers: int) -> int:
    target = total_bytes // max(1, workers * CHUNKS_PER_WORKER)
    return int(min(MAX_CHUNK_BYTES, max(MIN_CHUNK_BYTES, target)))


def _fast_backend(tokenizer: Any) -> Any:
    """The `tokenizers.Tokenizer` behind a fast HF tokenizer; None for a slow one.

    Taken from the loaded tokenizer rather than read from tokenizer.json, because transformers may
    adjust it while loading (e.g. Llama's pre-tokenizer from `legacy`).
    """
    try:
        return tokenizer.backend_tokenizer
    except AttributeError:
        return None


class _Encoder:
    """Parses and tokenizes chunks; one per worker process (or one in the parent for workers=1)."""

    def __init__(self, spec: _EncodeSpec, tokenizer: Any = None):
        """Use `tokenizer` (its Rust backend when it has one) or, without it, rebuild the backend from
        `spec.tokenizer_json`, or load a tokenizer from `spec.tokenizer_dir` and call it per batch."""
        self.spec = spec
        self.dtype = np.dtype(spec.dtype)
        self.hf_tokenizer: Any = None
        self.backend: Any = None
        if tokenizer is not None:
            self.backend = _fast_backend(tokenizer)
            self.hf_tokenizer = tokenizer if self.backend is None else None
        elif spec.tokenizer_json is not None:
            from tokenizers import Tokenizer

            self.backend = Tokenizer.from_str(spec.tokenizer_json)
        else:
            self.hf_tokenizer = load_tokenizer(spec.tokenizer_dir)
        # An exact word-cache encoder in front of the Rust backend (data.fast_tokenize); it keeps the
        # backend's own encode_batch_fast where it cannot reproduce the pipeline exactly.
        self.fast: BatchEncoder | None = None
        if self.backend is not None:
            self.fast = fast_encoder(self.backend) if spec.word_cache else BackendEncoder(self.backend)

    def encode(self, texts: list[str], where: str = "") -> list[list[int]]:
        """Token ids of each text without special tokens, on one thread."""
        if self.fast is None:
            return self.hf_tokenizer(texts, add_special_tokens=False)["input_ids"]
        ids = self.fast.encode_batch(texts)
        if texts and not isinstance(self.fast, BackendEncoder):
            self._spot_check(texts, ids, where)
        return ids

    def _spot_check(self, texts: list[str], ids: list[list[int]], where: str) -> None:
        """Re-encode the batch's longest document with the tokenizer's own pipeline: a guard, at ~1% of
        the work, against the word cache ever disagreeing with it (it is exact by construction)."""
        i = max(range(len(texts)), key=lambda k: len(texts[k]))
        expected = self.backend.encode(texts[i], add_special_tokens=False).ids
        if ids[i] != expected:
            raise RuntimeError(
                f"the word-cache tokenizer disagrees with the tokenizer's own encoding on document {i + 1} "
                f"of {where or 'a batch'}; please report this, and rerun with --no-word-cache"
            )

    def process(self, chunk: Piece) -> _PieceResult:
        texts, records = read_piece(chunk, self.spec.json_key, stop_at_bad=not self.spec.skip_bad_lines)
        result = _PieceResult(
            np.zeros(0, self.dtype), np.zeros(0, np.int32), records.records, records.blank_lines, 0,
            records.bad, records.bad_count,
        )  # fmt: skip
        if result.bad_count and not self.spec.skip_bad_lines:
            return result  # the parent raises; no point tokenizing
        bos, eos = self.spec.bos, self.spec.eos
        extra = (bos is not None) + (eos is not None)
        flat: list[int] = []
        lengths: list[int] = []
        for ids in self.encode(texts, chunk.describe()):
            if not ids:
                result.empty_documents += 1
                continue
            if bos is not None:
                flat.append(bos)
            flat.extend(ids)
            if eos is not None:
                flat.append(eos)
            lengths.append(len(ids) + extra)
        result.tokens = np.array(flat, dtype=self.dtype)
        result.lengths = np.array(lengths, dtype=np.int32)
        return result


_WORKER: _Encoder | None = None
_PARENT_ENCODER: _Encoder | None = None  # set while a forked pool runs; its workers inherit it


def _single_threaded_env() -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"


def _init_worker(spec: _EncodeSpec) -> None:
    """Pool initializer: one-thread tokenizer; Ctrl-C is left to the parent, which stops the pool.

    SIGTERM gets its default action back (a forked worker inherits the parent's handler), so that
    `Pool.terminate()` ends workers quietly. The pool is started with SIGTERM blocked (`_pool`): a
    terminate that comes before this point stays pending and kills the worker once unblocked here, instead
    of being lost in the fork and leaving a worker that the pool waits for forever.
    """
    global _WORKER
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    _single_threaded_env()
    _WORKER = _PARENT_ENCODER if _PARENT_ENCODER is not None else _Encoder(spec)


def _process_in_worker(chunk: Piece) -> _PieceResult:
    assert _WORKER is not None, "worker not initialised"
    return _WORKER.process(chunk)


@contextlib.contextmanager
def _one_thread_in_parent() -> Iterator[None]:
    """Run the parent's encoding on one thread (workers=1), restoring the caller's setting."""
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


def _pool(workers: int, spec: _EncodeSpec) -> Any:
    """A pool whose workers start with SIGTERM blocked, until `_init_worker` restores its default action."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        return multiprocessing.get_context(START_METHOD).Pool(
            workers, initializer=_init_worker, initargs=(spec,)
        )
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _results(
    chunks: Iterator[Piece], spec: _EncodeSpec, workers: int, tokenizer: Any
) -> Iterator[tuple[Piece, _PieceResult]]:
    """(chunk, result) in input order; at most IN_FLIGHT_PER_WORKER chunks per worker are pending."""
    global _PARENT_ENCODER
    encoder = _Encoder(spec, tokenizer)
    if workers == 1:
        with _one_thread_in_parent():
            for chunk in chunks:
                yield chunk, encoder.process(chunk)
        return
    if START_METHOD == "fork":
        _PARENT_ENCODER = encoder
    elif encoder.backend is not None:
        spec = dataclasses.replace(spec, tokenizer_json=encoder.backend.to_str())
    pool = _pool(workers, spec)
    try:
        pending: deque[tuple[Piece, Any]] = deque()
        for chunk in chunks:
            pending.append((chunk, pool.apply_async(_process_in_worker, (chunk,))))
            if len(pending) >= workers * IN_FLIGHT_PER_WORKER:
                done, async_result = pending.popleft()
                yield done, async_result.get()
        while pending:
            done, async_result = pending.popleft()
            yield done, async_result.get()
        pool.close()
    finally:
        pool.terminate()
        pool.join()
        _PARENT_ENCODER = None


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt so that `finally` blocks clean up (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"received signal {signum}")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


class _AtomicOutput:
    """Writes PREFIX.bin/.idx under temporary names and renames them only in `commit()`."""

    def __init__(self, prefix: str):
        suffix = f".tmp-{os.getpid()}"
        self.bin_path, self.idx_path = Path(f"{prefix}.bin"), Path(f"{prefix}.idx")
        self.tmp_bin = self.bin_path.with_name(self.bin_path.name + suffix)
        self.tmp_idx = self.idx_path.with_name(self.idx_path.name + suffix)
        self.bin_renamed = False
        self.committed = False
        self.file: BinaryIO | None = None

    def __enter__(self) -> _AtomicOutput:
        self.bin_path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.tmp_bin, "wb")
        return self

    def write(self, tokens: np.ndarray) -> None:
        assert self.file is not None, "write() outside the with block"
        self.file.write(memoryview(tokens).cast("B"))

    def commit(self, dtype: np.dtype, lengths: np.ndarray) -> None:
        """Finish both files and move them into place: .bin first, .idx last."""
        assert self.file is not None, "commit() outside the with block"
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        write_index(self.tmp_idx, dtype, lengths)
        with open(self.tmp_idx, "rb") as f:
            os.fsync(f.fileno())
        # An old .idx next to the new .bin would look like a complete dataset: remove it first.
        self.idx_path.unlink(missing_ok=True)
        os.replace(self.tmp_bin, self.bin_path)
        self.bin_renamed = True
        os.replace(self.tmp_idx, self.idx_path)
        self.committed = True

    def __exit__(self, *exc: object) -> None:
        if self.file is not None and not self.file.closed:
            self.file.close()
        if not self.committed:
            for path in (self.tmp_bin, self.tmp_idx):
                path.unlink(missing_ok=True)
            if self.bin_renamed:
                self.bin_path.unlink(missing_ok=True)


def _make_spec(
    tokenizer: Any,
    tokenizer_dir: str,
    json_key: str,
    append_eod: bool,
    add_bos: bool,
    skip_bad_lines: bool,
    word_cache: bool = True,
) -> _EncodeSpec:
    """What every worker needs to know besides the tokenizer itself."""
    return _EncodeSpec(
        tokenizer_json=None,  # filled in only for spawned workers
        tokenizer_dir=tokenizer_dir,
        json_key=json_key,
        bos=bos_id(tokenizer) if add_bos else None,
        eos=eod_id(tokenizer) if append_eod else None,
        dtype=np.dtype(token_dtype(len(tokenizer))).name,
        skip_bad_lines=skip_bad_lines,
        word_cache=word_cache,
    )


def _check_args(inputs: list[str], json_key: str, workers: int) -> None:
    if isinstance(inputs, str):
        raise ValueError(f"inputs must be a list of paths or patterns, got the string {inputs!r}")
    if not json_key:
        raise ValueError("json_key must not be empty")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")


def prepare_dataset(
    inputs: list[str],
    tokenizer_dir: str,
    output_prefix: str,
    json_key: str = "text",
    append_eod: bool = False,
    add_bos: bool = True,
    workers: int = 1,
    skip_bad_lines: bool = False,
    word_cache: bool = True,
) -> PrepareStats:
    """Tokenize JSONL `inputs` into `output_prefix`_<json_key>_document.{bin,idx}; see the module doc."""
    start = time.perf_counter()
    _check_args(inputs, json_key, workers)
    files = expand_inputs(list(inputs))
    tokenizer = load_tokenizer(tokenizer_dir)
    spec = _make_spec(
        tokenizer, str(tokenizer_dir), json_key, append_eod, add_bos, skip_bad_lines, word_cache
    )
    prefix = output_prefix_for(output_prefix, json_key)
    stats = PrepareStats([str(f) for f in files], f"{prefix}.bin", f"{prefix}.idx", spec.dtype)
    stats.files = [FileStats(str(f)) for f in files]
    input_bytes = sum(f.stat().st_size for f in files)
    text_total = sum(text_bytes(f) for f in files)  # decompressed: pieces as large for every format
    chunks = iter_pieces(files, _chunk_bytes(text_total, workers))
    # A second prepare of the same prefix is refused: two could rename a .bin and an .idx of different runs.
    lock = RunLock(Path(f"{prefix}.lock"), f"output prefix {prefix}")
    # Exit order matters: stop the workers, then remove temporary files, then restore SIGTERM.
    try:
        with (
            _sigterm_as_interrupt(),
            _AtomicOutput(prefix) as out,
            contextlib.closing(_results(chunks, spec, workers, tokenizer)) as results,
        ):
            lengths = _write_all(results, out, stats, skip_bad_lines, start, input_bytes)
            out.commit(np.dtype(spec.dtype), lengths)
    except OSError as err:
        if not is_out_of_space(err):
            raise
        # About 3 bytes of text per token, the token file dominates.
        needed = text_total // 3 * np.dtype(spec.dtype).itemsize
        raise out_of_space_error(err, Path(f"{prefix}.bin"), needed) from err
    finally:
        lock.release()
    stats.seconds = time.perf_counter() - start
    return stats


def _write_all(
    results: Iterator[tuple[Piece, _PieceResult]],
    out: _AtomicOutput,
    stats: PrepareStats,
    skip_bad_lines: bool,
    start: float,
    input_bytes: int,
) -> np.ndarray:
    """Write each piece's tokens in order, raise on bad records (unless skipped); return all lengths.

    The progress bar counts input bytes (compressed bytes for compressed files), so its ETA holds for
    any mix of formats.
    """
    from tqdm import tqdm

    lengths: list[np.ndarray] = []
    lines_before, current_file, reported = 0, -1, 0
    bar = tqdm(desc="prepare", total=input_bytes, unit="B", unit_scale=True, file=sys.stderr,
               dynamic_ncols=True, mininterval=0.5)  # fmt: skip
    with bar:
        for chunk, result in results:
            if chunk.file_index != current_file:
                lines_before, current_file = 0, chunk.file_index
            # JSON lines count lines across a file's pieces; columnar pieces know their first row
            base, unit = (lines_before, "line") if chunk.kind == "lines" else (chunk.first_row, "row")
            for number, reason in result.bad:
                where = f"{chunk.path}, {unit} {base + number}"
                if not skip_bad_lines:
                    raise ValueError(f"{where}: {reason} (use --skip-bad-lines to skip such {unit}s)")
                if reported < MAX_REPORTED_BAD_LINES:
                    bar.write(f"skipping {where}: {reason}", file=sys.stderr)
                    reported += 1
            lines_before += result.lines
            out.write(result.tokens)
            lengths.append(result.lengths)
            _count(stats, chunk.file_index, result)
            bar.update(chunk.size)
            bar.set_postfix_str(f"{stats.tokens / max(time.perf_counter() - start, 1e-9):,.0f} tokens/s")
    return np.concatenate(lengths) if lengths else np.zeros(0, np.int32)


def _count(stats: PrepareStats, file_index: int, result: _PieceResult) -> None:
    stats.documents += len(result.lengths)
    stats.tokens += len(result.tokens)
    stats.bad_lines += result.bad_count
    stats.empty_documents += result.empty_documents
    stats.blank_lines += result.blank_lines
    per_file = stats.files[file_index]
    per_file.documents += len(result.lengths)
    per_file.tokens += len(result.tokens)
    per_file.skipped += result.bad_count + result.empty_documents
