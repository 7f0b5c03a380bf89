"""Benchmark: `moe-recipes prepare` on the same corpus as Parquet and `.jsonl.zst`, against `.jsonl`.

The corpus (the Debian Reference, repeated to --mb megabytes, as in prepare_throughput.py) is written as
JSONL, as FineWeb-shaped Parquet (the text column beside id, url, ...; --row-groups row groups, snappy, as
pyarrow writes by default) and as zstd JSON lines (level 3, the zstd command's default). Each is prepared
with 1 and 2 workers in the same run, runs interleaved, best of --repeat; the script checks that every
format wrote the JSONL run's bytes. Printed: tokens/s of each and its ratio to JSONL with the same
workers, plus the time it takes one process to decompress and read the texts alone (no tokenizing), which
is the most a format should add.

    .venv/bin/python benchmarks/prepare_formats.py [--mb 8] [--workers 1 2] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from prepare_throughput import TOKENIZERS, build_corpus, cpu_seconds  # noqa: E402


def write_formats(jsonl: Path, row_groups: int) -> dict[str, Path]:
    """The JSONL file, its Parquet twin and its zstd twin."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    texts = [json.loads(line)["text"] for line in jsonl.read_bytes().splitlines()]
    n = len(texts)
    table = pa.table(
        {
            "text": texts,
            "id": [f"<urn:uuid:{i:08d}>" for i in range(n)],
            "url": [f"https://example.org/{i}" for i in range(n)],
            "language_score": [0.9] * n,
        }
    )
    parquet = jsonl.with_suffix(".parquet")
    pq.write_table(table, parquet, row_group_size=max(1, -(-n // row_groups)))
    zst = jsonl.with_suffix(".jsonl.zst")
    zst.write_bytes(zstandard.ZstdCompressor(level=3, write_checksum=True).compress(jsonl.read_bytes()))
    return {"jsonl": jsonl, "parquet": parquet, "jsonl.zst": zst}


def read_only_seconds(path: Path) -> float:
    """Decompress and read every text of `path` in this process, without tokenizing."""
    from moe_recipes.data.readers import iter_pieces, read_piece

    start = time.perf_counter()
    for piece in iter_pieces([path], 4 << 20):
        read_piece(piece, "text", stop_at_bad=False)
    return time.perf_counter() - start


def run(path: Path, tokenizer_dir: str, prefix: Path, workers: int) -> tuple[float, float, int]:
    from moe_recipes.data.prepare import prepare_dataset

    cpu, start = cpu_seconds(), time.perf_counter()
    stats = prepare_dataset([str(path)], tokenizer_dir, str(prefix), append_eod=True, workers=workers)
    return time.perf_counter() - start, cpu_seconds() - cpu, stats.tokens


def measure(files: dict[str, Path], tokenizer_dir: str, workers: int, repeat: int, folder: Path) -> dict:
    best: dict[str, list[float]] = {name: [float("inf"), float("inf")] for name in files}
    tokens = 0
    run(files["jsonl"], tokenizer_dir, folder / "warm-up", workers)  # page cache, imports, tokenizer files
    for _ in range(repeat):
        for name, path in files.items():
            seconds, cpu, tokens = run(path, tokenizer_dir, folder / name, workers)
            best[name] = [min(best[name][0], seconds), min(best[name][1], cpu)]
        for suffix in (".bin", ".idx"):
            want = Path(f"{folder}/jsonl_text_document{suffix}").read_bytes()
            for name in files:
                if Path(f"{folder}/{name}_text_document{suffix}").read_bytes() != want:
                    raise SystemExit(f"{name} wrote other {suffix} bytes than jsonl")
    return {"tokens": tokens, "best": best}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=8.0, help="corpus size in MB of JSONL (default 8)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--tokenizers", nargs="+", default=["mixtral", "deepseek"])
    parser.add_argument("--lang", default="en", choices=["en", "ja"])
    parser.add_argument("--row-groups", type=int, default=32, help="row groups in the Parquet file")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each; the fastest counts")
    args = parser.parse_args()
    os.environ["TQDM_DISABLE"] = "1"
    print(f"CPUs: {os.cpu_count()}, load average at start: {os.getloadavg()[0]:.2f}, corpus ~{args.mb} MB")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        files = write_formats(build_corpus(args.lang, "section", args.mb, folder), args.row_groups)
        for name, path in files.items():
            print(f"{name:<10} {path.stat().st_size / 1e6:7.2f} MB on disk, "
                  f"read alone in {min(read_only_seconds(path) for _ in range(args.repeat)):.3f} s")  # fmt: skip
        print(f"{'tokenizer':<9} {'workers':>7} {'format':<10} {'tokens':>9} {'s':>6} {'tokens/s':>10} "
              f"{'vs jsonl':>8} {'CPU s':>6} {'CPU vs jsonl':>12}")  # fmt: skip
        for tok in args.tokenizers:
            for workers in args.workers:
                r = measure(files, str(TOKENIZERS[tok]), workers, args.repeat, folder)
                base_s, base_cpu = r["best"]["jsonl"]
                for name, (seconds, cpu) in r["best"].items():
                    print(f"{tok:<9} {workers:>7} {name:<10} {r['tokens']:>9} {seconds:>6.2f} "
                          f"{r['tokens'] / seconds:>10,.0f} {base_s / seconds:>7.2f}x {cpu:>6.2f} "
                          f"{base_cpu / cpu:>11.2f}x", flush=True)  # fmt: skip
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    sys.exit(main())
