"""Benchmark: peak memory of `moe-recipes upcycle` (streaming) against the previous, in-memory upcycle.

A random dense Llama in bf16 (no download; --hidden, --layers, --intermediate, --vocab set its size) is saved
with `save_pretrained`, then upcycled to Mixtral with --experts experts, once by each implementation, each in
a fresh child process:

* old: `models/upcycle.py` as it was before streaming (read with `git show REV:...` into a temporary module;
  REV defaults to the parent of the commit that removed `upcycle_model`): loads the dense model in fp32,
  builds and initialises the whole MoE model in fp32, overwrites it and writes it with `save_pretrained`
  (in fp32: it missed the dense dtype);
* new: the streaming `upcycle` with --max-shard-size (bf16 output, the dense dtype).

Printed per run: peak resident set of the child (`ru_maxrss`), the bytes of safetensors written, and
peak / output; also the resident set of a child that only imports torch, transformers and moe_recipes (the
floor no run goes below). Goal: the new peak at most half its output's size.

    PYTHONPATH=src .venv/bin/python benchmarks/upcycle_memory.py [--layers 8 --max-shard-size 200MB ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

GOAL = 0.5  # new peak RSS / output size, at most
ROOT = Path(__file__).resolve().parents[1]
UPCYCLE = "src/moe_recipes/models/upcycle.py"

# Each child prints one JSON line: its peak resident set in bytes (ru_maxrss is KiB on Linux).
_CHILD_END = """
import json, resource
print(json.dumps({"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""
_FLOOR = "import torch, transformers, moe_recipes.hf_folder, moe_recipes.models.inspect\n" + _CHILD_END
_NEW = (
    """
import sys
from moe_recipes.models.upcycle import upcycle
upcycle(sys.argv[1], "mixtral", int(sys.argv[3]), 2, sys.argv[2], max_shard_size=sys.argv[4])
"""
    + _CHILD_END
)
_OLD = (
    """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("_old_upcycle", sys.argv[5])
old = importlib.util.module_from_spec(spec)
spec.loader.exec_module(old)
old.upcycle(sys.argv[1], "mixtral", int(sys.argv[3]), 2, sys.argv[2])
"""
    + _CHILD_END
)
_DENSE = """
import sys, torch
from transformers import AutoModelForCausalLM, LlamaConfig
hidden, layers, inter, vocab = map(int, sys.argv[2:6])
config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter, vocab_size=vocab,
                     num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64)
torch.manual_seed(0)
AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(sys.argv[1])
"""


def _child(code: str, *args: str) -> dict:
    env = os.environ | {"PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run(
        [sys.executable, "-c", code, *args], env=env, check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _weights_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def _old_rev() -> str:
    """The parent of the newest commit that removed `def upcycle_model` (the in-memory upcycle)."""
    log = subprocess.run(
        ["git", "log", "-S", "def upcycle_model", "--format=%H", "--", UPCYCLE],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    )
    return log.stdout.split()[0] + "^"


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument(
        "--max-shard-size", default="50GB", help="as upcycle's default (transformers' save_pretrained)"
    )
    p.add_argument("--old-rev", default=None, help="git revision of the old upcycle.py (default: see above)")
    p.add_argument("--workdir", default=None)
    args = p.parse_args()
    rev = args.old_rev or _old_rev()
    old_source = subprocess.run(
        ["git", "show", f"{rev}:{UPCYCLE}"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        (work / "old_upcycle.py").write_text(old_source)
        dense = work / "dense"
        size = [str(v) for v in (args.hidden, args.layers, args.intermediate, args.vocab)]
        _child(_DENSE + _CHILD_END, str(dense), *size)
        floor = _child(_FLOOR)["peak"]
        rows = []
        for name, code in (("new (streaming)", _NEW), ("old (in memory)", _OLD)):
            out = work / name.split()[0]
            peak = _child(
                code,
                str(dense),
                str(out),
                str(args.experts),
                args.max_shard_size,
                str(work / "old_upcycle.py"),
            )
            written = _weights_bytes(out)
            dtype = json.loads((out / "config.json").read_text()).get("dtype")
            rows.append((name, peak["peak"], written, dtype))
            shutil.rmtree(out)
        print(f"CPU: {_cpu()} ({os.cpu_count()} cores); old upcycle.py from {rev}")
        print(
            f"dense: {_gb(_weights_bytes(dense))} bf16 ({' '.join(size)}: hidden layers intermediate vocab); "
            f"{args.experts} experts; new --max-shard-size {args.max_shard_size}; import floor {_gb(floor)}"
        )
        print(f"{'run':<17} {'peak RSS':>10} {'output':>10} {'dtype':>9} {'peak/output':>12}")
        for name, peak, written, dtype in rows:
            print(f"{name:<17} {_gb(peak):>10} {_gb(written):>10} {dtype:>9} {peak / written:>12.2f}")
        (_, new_peak, new_out, _), (_, old_peak, _, _) = rows
        print(
            f"old peak / new peak: {old_peak / new_peak:.2f}x; goal new peak/output <= {GOAL}: "
            f"{'met' if new_peak / new_out <= GOAL else 'NOT met'}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
