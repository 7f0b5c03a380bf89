"""Smoke run of every documented command in a venv that has only `pip install .` plus the DeepSpeed extra.

`make test-install` builds that venv (no dev extras: no pytest, no megatron-core, nothing the tests pull in)
and runs this file with its Python, from outside the repository so that only the installed package is
importable. It catches dependencies that are used at run time but declared only for development (e.g.
ZeRO-3 needs accelerate through transformers' HfDeepSpeedConfig). Not a pytest module: it must run without
pytest installed.

    python tests/install_smoke.py REPO_DIR WORK_DIR
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

# (name, config overrides): one short run per engine and ZeRO stage
RUNS = [
    ("zero0", ["distributed.zero_stage=0"]),
    ("zero1", ["distributed.zero_stage=1"]),
    ("zero2", ["distributed.zero_stage=2"]),
    ("zero3", ["distributed.zero_stage=3"]),
    ("fsdp2", ["distributed.engine=fsdp2"]),
]


def cli(*args: str, cwd: Path) -> str:
    """Run the installed `moe-recipes` (beside this interpreter); fail with its output on error."""
    exe = Path(sys.executable).parent / "moe-recipes"
    start = time.perf_counter()
    run = subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=900)
    took = time.perf_counter() - start
    if run.returncode != 0:
        sys.exit(
            f"FAILED: moe-recipes {' '.join(args)} (exit {run.returncode})\n"
            f"--- stdout ---\n{run.stdout[-4000:]}\n--- stderr ---\n{run.stderr[-4000:]}"
        )
    print(
        f"ok   moe-recipes {args[0]} {' '.join(a for a in args[1:] if '=' in a)} ({took:.1f} s)", flush=True
    )
    return run.stdout


def main(repo: Path, work: Path) -> int:
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus.jsonl"
    lines = (repo / "demo" / "corpus" / "debian-reference.en.jsonl").read_text().splitlines()[:60]
    corpus.write_text("\n".join(lines) + "\n")
    tokenizer = repo / "demo" / "tokenizer"
    cli("--help", cwd=work)
    cli("prepare", "--input", str(corpus), "--tokenizer", str(tokenizer), "--output-prefix", "data/en",
        "--append-eod", cwd=work)  # fmt: skip
    cli("data-info", "data/en_text_document", "--tokenizer", str(tokenizer), cwd=work)
    cli("init-model", "--arch", "mixtral", "--tokenizer", str(tokenizer), "--output", "base", "--hidden-size",
        "64", "--layers", "2", "--experts", "4", "--top-k", "2", "--max-position-embeddings", "256", cwd=work)  # fmt: skip
    (work / "smoke.yaml").write_text(
        "model: {path: base}\n"
        "data: {path: data/en_text_document, seq_length: 64, split: '90,10,0', num_workers: 0}\n"
        "train: {micro_batch_size: 2, global_batch_size: 4, iters: 2}\n"
        "eval: {interval: 2, iters: 1}\n"
        "log: {progress_bar: false}\n"
    )
    for name, extra in RUNS:
        cli("train", "smoke.yaml", f"log.dir=runs/{name}", f"checkpoint.save=ckpt/{name}", *extra, cwd=work)
    out = cli("inspect", "smoke.yaml", "--json", "--count", "2", cwd=work)
    assert [json.loads(line)["index"] for line in out.splitlines()] == [0, 1], out  # JSON only on stdout
    for name, _ in RUNS:
        cli("convert", f"ckpt/{name}", "--output", f"hf/{name}", cwd=work)
    out = cli("eval", "hf/zero3", "--data", "data/en_text_document", "--seq-length", "64", "--split", "90,10,0",
              "--max-samples", "4", cwd=work)  # fmt: skip
    print("     " + out.strip().splitlines()[-1])
    cli("generate", "hf/fsdp2", "--prompt", "Debian", "--max-new-tokens", "4", cwd=work)
    # accelerate's placement (a dependency of `pip install .`, not of an extra)
    cli("generate", "hf/fsdp2", "--prompt", "Debian", "--max-new-tokens", "4", "--device-map", "auto",
        cwd=work)  # fmt: skip
    cli("plot", "runs/zero2", cwd=work)
    records = [json.loads(x) for x in (work / "runs" / "fsdp2" / "metrics.jsonl").read_text().splitlines()]
    assert any("lm_loss" in r for r in records), "no training record written"
    print("install smoke: all documented commands ran from a venv without the dev extras")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    sys.exit(main(Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()))
