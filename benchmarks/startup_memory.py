"""Benchmark: per-rank start-up memory and time of FSDP2, whole-model load vs sharded start, 1 / 2 / 4 ranks.

A random Qwen3-MoE (no download; --hidden/--layers/--experts/--expert-width set its size) is saved in bf16, as
released checkpoints are. Each configuration starts fresh processes (torchrun, gloo, CPU) that do what the
trainer does at start-up, up to the first step: build the model, cut the experts (EP), `fully_shard` every
decoder layer and the root, and load the weights, either

* `whole`: `load_model` (from_pretrained of the whole fp32 model on every rank), then shard it (the trainer's
  path before the sharded start), or
* `sharded`: `build_on_meta`, shard, `to_empty`, `fill_from_folder` (the trainer's FSDP2 path now).

Per rank it records the peak resident set over the start-up minus the resident set after the imports
(`VmHWM - baseline`, Linux; glibc told to return freed blocks) and the time. The table shows the largest
rank, and the ratio of that peak on N ranks to the same mode's peak on 1 rank: a load that reads only
each rank's part gives about 1/N; a load that materialises the whole model on every rank about 1.

    PYTHONPATH=src .venv/bin/python benchmarks/startup_memory.py [--worlds 1 2 4] [--ep 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOAL = 0.6  # peak on 2 ranks / peak on 1 rank, at most, for the sharded start
MIB = 2**20


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(mode: str, folder: str, ep: int) -> None:
    """One rank: start the model as the trainer does in `mode`; print a JSON line with its figures."""
    import torch
    import torch.distributed as dist

    from moe_recipes.config import Config
    from moe_recipes.models.inspect import inspect_model
    from moe_recipes.models.loading import load_model
    from moe_recipes.models.sharded_load import build_on_meta
    from moe_recipes.train.fsdp_engine import shard_and_fill

    dist.init_process_group("gloo")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
    baseline = _rss_kib("VmRSS")
    start = time.perf_counter()
    model = build_on_meta(folder) if mode == "sharded" else load_model(folder)
    cfg = Config()
    cfg.distributed.expert_parallel_size = ep
    shard_and_fill(
        model, model, cfg, inspect_model(model), torch.device("cpu"), folder if mode == "sharded" else None
    )
    dist.barrier()
    took = time.perf_counter() - start
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())
    print(
        "RESULT "
        + json.dumps(
            {
                "rank": dist.get_rank(),
                "peak_mib": (_rss_kib("VmHWM") - baseline) / 1024,
                "seconds": took,
                "local_params": local,
                "dtype": str(next(model.parameters()).dtype),
            }
        ),
        flush=True,
    )
    dist.destroy_process_group()


def make_model(folder: Path, args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "qwen3_moe",
        vocab_size=32000,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        moe_intermediate_size=args.expert_width,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        num_experts=args.experts,
        num_experts_per_tok=2,
    )
    with torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(str(folder))
    return sum(p.numel() for p in model.parameters())


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(mode: str, world: int, folder: Path, ep: int) -> list[dict]:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MALLOC_MMAP_THRESHOLD_": "65536",
        "MALLOC_TRIM_THRESHOLD_": "0",
    }
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", f"--master_port={_free_port()}",
        __file__, "--child", mode, str(folder), "--ep", str(ep if world > 1 else 1),
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    decoder = json.JSONDecoder()  # a rank's line may run on into another rank's output
    rows = [decoder.raw_decode(part)[0] for part in out.stdout.split("RESULT ")[1:]]
    if out.returncode != 0 or len(rows) != world:
        raise RuntimeError(f"{mode} on {world} ranks failed:\n{out.stderr[-3000:]}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", nargs=2, metavar=("MODE", "FOLDER"))
    parser.add_argument("--ep", type=int, default=1, help="expert-parallel size on more than one rank")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--expert-width", type=int, default=512)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.ep)
        return
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?"
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        params = make_model(folder, args)
        size = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / MIB
        print(
            f"# {platform.node()} | {cpu} | Qwen3-MoE {params / 1e6:.0f} M parameters, bf16 files {size:.0f} MiB"
        )
        print(
            f"# EP {args.ep} on more than one rank; peak = VmHWM - resident set after imports, largest rank"
        )
        print("| mode | ranks | peak MiB/rank | vs 1 rank | seconds | fp32 params held/rank |")
        print("|---|---|---|---|---|---|")
        for mode in ("whole", "sharded"):
            one = None
            for world in args.worlds:
                rows = run(mode, world, folder, args.ep)
                peak = max(r["peak_mib"] for r in rows)
                one = one if one is not None else peak
                held = max(r["local_params"] for r in rows)
                secs = max(r["seconds"] for r in rows)
                print(
                    f"| {mode} | {world} | {peak:.0f} | {peak / one:.2f}x | {secs:.1f} | {held / 1e6:.0f} M |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
