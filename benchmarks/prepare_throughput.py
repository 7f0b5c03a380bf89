"""Benchmark: `moe-recipes prepare` against a Megatron-LM style `tools/preprocess_data.py` baseline.

Both tokenize the same JSONL corpus (the Debian Reference, repeated to --mb megabytes) with the same
tokenizer and the same number of worker processes, in the same run, and write the same
Megatron-format .bin/.idx with the project's index writer. The baseline does what Megatron-LM's
preprocessing tool does: a `multiprocessing.Pool` whose `imap` (chunksize 32) ships raw lines from
the parent to the workers, which `json.loads` each line, call the Hugging Face tokenizer once per
document (`tokenizer(text)["input_ids"]` + EOD) and send Python lists of ids back to the parent,
which converts them to numpy and writes them.

To compare like with like, ours runs with `add_bos` set to what the tokenizer does by itself
(Mixtral adds BOS, DeepSeek does not) and `append_eod=True`, so both write byte-identical files;
the script checks that. Every run builds its own processes and loads its own tokenizer; each
configuration is measured --repeat times and the fastest run counts.

    .venv/bin/python benchmarks/prepare_throughput.py [--mb 8] [--workers 1 2] [--repeat 3] [--units section paragraph]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.assets import CORPUS_EN, CORPUS_JA, DEEPSEEK_TOKENIZER, MIXTRAL_TOKENIZER  # noqa: E402

CORPORA = {"en": CORPUS_EN, "ja": CORPUS_JA}
TOKENIZERS = {"mixtral": MIXTRAL_TOKENIZER, "deepseek": DEEPSEEK_TOKENIZER}

_BASELINE_TOKENIZER = None


def _baseline_init(tokenizer_dir: str) -> None:
    """Pool initializer: every worker builds its own HF tokenizer, as Megatron's Encoder does."""
    global _BASELINE_TOKENIZER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker, as for ours
    os.environ["RAYON_NUM_THREADS"] = "1"
    from transformers import AutoTokenizer

    _BASELINE_TOKENIZER = AutoTokenizer.from_pretrained(tokenizer_dir)


def _baseline_encode(line: str) -> tuple[list[list[int]], list[int], int]:
    """One document per call: json.loads, one HF tokenizer call, EOD appended (Megatron's --append-eod)."""
    text = json.loads(line)["text"]
    ids = _BASELINE_TOKENIZER(text)["input_ids"]
    if not ids:
        return [], [], len(line)
    ids.append(_BASELINE_TOKENIZER.eos_token_id)
    return [ids], [len(ids)], len(line)


def run_baseline(path: Path, tokenizer_dir: str, prefix: Path, workers: int) -> tuple[float, int]:
    """Megatron-LM `tools/preprocess_data.py`-style run; returns (seconds, tokens)."""
    from transformers import AutoTokenizer

    from moe_recipes.data.indexed import token_dtype, write_index

    start = time.perf_counter()
    dtype = token_dtype(len(AutoTokenizer.from_pretrained(tokenizer_dir)))
    lengths: list[int] = []
    pool = multiprocessing.Pool(workers, initializer=_baseline_init, initargs=(tokenizer_dir,))
    with open(path, encoding="utf-8") as fin, open(f"{prefix}.bin", "wb") as out:
        for doc, doc_lengths, _ in pool.imap(_baseline_encode, fin, 32):
            out.write(np.array(doc, dtype=dtype).tobytes(order="C"))
            lengths.extend(doc_lengths)
    pool.close()
    pool.join()
    write_index(f"{prefix}.idx", dtype, np.array(lengths, dtype=np.int32))
    return time.perf_counter() - start, int(sum(lengths))


def run_ours(path: Path, tokenizer_dir: str, prefix: Path, workers: int, add_bos: bool) -> tuple[float, int]:
    from moe_recipes.data.prepare import prepare_dataset

    start = time.perf_counter()
    stats = prepare_dataset([str(path)], tokenizer_dir, str(prefix), append_eod=True, add_bos=add_bos,
                            workers=workers)  # fmt: skip
    return time.perf_counter() - start, stats.tokens


def build_corpus(lang: str, unit: str, megabytes: float, folder: Path) -> Path:
    """The real corpus, repeated whole until it reaches `megabytes`.

    unit "section": the corpus' own documents (one book section each, ~2.4 KB on average);
    unit "paragraph": every paragraph (text between blank lines) made its own document, which shows
    how both tools behave on corpora of short documents.
    """
    source = CORPORA[lang].read_bytes()
    if unit == "paragraph":
        rows = []
        for line in source.decode("utf-8").splitlines():
            paragraphs = json.loads(line)["text"].split("\n\n")
            rows += [json.dumps({"text": p}, ensure_ascii=False) for p in paragraphs if p.strip()]
        source = ("\n".join(rows) + "\n").encode("utf-8")
    copies = max(1, round(megabytes * 1e6 / len(source)))
    path = folder / f"{lang}-{unit}.jsonl"
    path.write_bytes(source * copies)
    return path


def tokenizer_adds_bos(tokenizer_dir: str) -> bool:
    from moe_recipes.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    ids = tok("a")["input_ids"]
    return tok.bos_token_id is not None and bool(ids) and ids[0] == tok.bos_token_id


def cpu_seconds() -> float:
    """User + system CPU time of this process and of its finished (joined) children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure(path: Path, tokenizer_dir: str, workers: int, repeat: int, folder: Path) -> dict:
    """Best-of-`repeat` wall and CPU seconds of each, runs interleaved; checks both wrote the same bytes.

    CPU seconds (all processes of the run) are reported too because they barely change when other
    programs compete for the cores, while wall-clock time does.
    """
    add_bos = tokenizer_adds_bos(tokenizer_dir)
    runs = {
        "baseline": lambda: run_baseline(path, tokenizer_dir, folder / "base", workers),
        "ours": lambda: run_ours(path, tokenizer_dir, folder / "ours", workers, add_bos),
    }
    best = {f"{k}{unit}": float("inf") for k in runs for unit in ("", "_cpu")}
    tokens = {}
    for _ in range(repeat):
        for key, run in runs.items():
            cpu = cpu_seconds()
            seconds, tokens[key] = run()
            best[key] = min(best[key], seconds)
            best[f"{key}_cpu"] = min(best[f"{key}_cpu"], cpu_seconds() - cpu)
        for suffix in (".bin", ".idx"):
            theirs = Path(f"{folder}/base{suffix}").read_bytes()
            if Path(f"{folder}/ours_text_document{suffix}").read_bytes() != theirs:
                raise SystemExit(f"outputs differ ({suffix}) for {path.name} / {tokenizer_dir}")
    return {"tokens": tokens["ours"], **best}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=8.0, help="corpus size in MB (default 8)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--tokenizers", nargs="+", default=["mixtral", "deepseek"])
    parser.add_argument("--langs", nargs="+", default=["ja", "en"])
    parser.add_argument(
        "--units",
        nargs="+",
        default=["section", "paragraph"],
        choices=["section", "paragraph"],
        help="what one document is (see build_corpus)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs of each; the fastest counts")
    args = parser.parse_args()
    os.environ["TQDM_DISABLE"] = "1"  # keep the table readable; the bar costs next to nothing
    print(f"CPUs: {os.cpu_count()}, load average at start: {os.getloadavg()[0]:.2f}, corpus ~{args.mb} MB")
    header = f"{'tokenizer':<9} {'corpus':<12} {'workers':>7} {'tokens':>10} {'baseline s':>10} " \
             f"{'baseline tok/s':>14} {'ours s':>7} {'ours tok/s':>11} {'speed-up':>8} " \
             f"{'baseline CPU s':>14} {'ours CPU s':>10} {'CPU ratio':>9}"  # fmt: skip
    print(header)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name in args.tokenizers:
            tokenizer_dir = str(TOKENIZERS[name])
            for lang, unit in [(lang, unit) for unit in args.units for lang in args.langs]:
                path = build_corpus(lang, unit, args.mb, folder)
                for workers in args.workers:
                    r = measure(path, tokenizer_dir, workers, args.repeat, folder)
                    print(f"{name:<9} {lang + '-' + unit:<12} {workers:>7} {r['tokens']:>10} {r['baseline']:>10.2f} "
                          f"{r['tokens'] / r['baseline']:>14,.0f} {r['ours']:>7.2f} "
                          f"{r['tokens'] / r['ours']:>11,.0f} {r['baseline'] / r['ours']:>7.2f}x "
                          f"{r['baseline_cpu']:>14.2f} {r['ours_cpu']:>10.2f} "
                          f"{r['baseline_cpu'] / r['ours_cpu']:>8.2f}x", flush=True)  # fmt: skip
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    sys.exit(main())
