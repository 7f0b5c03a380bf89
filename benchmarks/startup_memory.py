"""Benchmark: per-rank start-up memory and time, whole-model load vs reading only each rank's part, 1 / 2 / 4 ranks.

A random Qwen3-MoE (no download; --hidden/--layers/--experts/--expert-width set its size) is saved in bf16, as
released checkpoints are. Each configuration starts fresh processes (torchrun, gloo, CPU) that do what the
trainer does at start-up, up to the model the engine takes (the optimizer is not built), in two ways per
`--engine`:

* `fsdp2`: `whole` = `load_model` (from_pretrained of the whole fp32 model on every rank), cut the experts
  (EP), `fully_shard`; `sharded` = `build_on_meta`, cut, `fully_shard`, `to_empty`, `fill_from_folder`.
* `zero3`: `whole` = `load_model` under transformers' `HfDeepSpeedConfig` (from_pretrained builds under
  `deepspeed.zero.Init`: the trainer's ZeRO-3 path before the partitioned start); `partitioned` =
  `build_on_meta`, `partition_and_fill` (each parameter's flat ZeRO-3 partition, read from the file rows that
  cover it).
* `zero2`: DeepSpeed ZeRO 0-2, which replicate the model by design: `whole` = `load_model`; with `--ep 2`
  also the EP cut (`shard_experts`) after it, against `experts` = `build_on_meta`, cut,
  `materialise_and_fill` (each rank reads its experts and the replicated rest).

Per rank it records the peak resident set over the start-up minus the resident set after the imports
(`VmHWM - baseline`, Linux; glibc told to return freed blocks) and the time. The table shows the largest
rank, the ratio of that peak on N ranks to the same mode's peak on 1 rank (a load that reads only each rank's
part gives about 1/N; one that materialises the whole model on every rank about 1), and that peak and the
peak of the heap alone (`RssAnon`, sampled every millisecond) over the fp32 model's size: a heap peak near 1
on one rank means no transient second copy of the weights; the rest of the peak is the touched pages of the
memory-mapped files (page cache, shared by the ranks of a node).

    PYTHONPATH=src .venv/bin/python benchmarks/startup_memory.py [--engine fsdp2|zero3|zero2] [--worlds 1 2 4] [--ep 2]
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


class _AnonPeak:
    """The largest anonymous resident set (heap: tensors, not mapped files) seen, sampled every millisecond."""

    def __init__(self) -> None:
        import threading

        self.peak = _rss_kib("RssAnon")
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._done.wait(0.001):
            self.peak = max(self.peak, _rss_kib("RssAnon"))

    def stop(self) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_kib("RssAnon"))


MODES = {"fsdp2": ("whole", "sharded"), "zero3": ("whole", "partitioned"), "zero2": ("whole", "experts")}


def child(engine: str, mode: str, folder: str, ep: int) -> None:
    """One rank: start the model as the trainer does in `mode`; print a JSON line with its figures."""
    import torch.distributed as dist

    if engine == "fsdp2":
        dist.init_process_group("gloo")
    else:
        import deepspeed

        from moe_recipes.distributed.env import _skip_deepspeed_shm_op

        _skip_deepspeed_shm_op()  # as the trainer does: no JIT build of an op that training never uses
        deepspeed.init_distributed(dist_backend="gloo")
    _start(engine, "", "", ep)  # imports only: their memory is not the start-up's
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
    baseline, baseline_anon = _rss_kib("VmRSS"), _rss_kib("RssAnon")
    anon = _AnonPeak()
    start = time.perf_counter()
    model = _start(engine, mode, folder, ep)
    dist.barrier()
    took = time.perf_counter() - start
    anon.stop()
    local = 0
    for p in model.parameters():
        held = p.ds_tensor if getattr(p, "ds_tensor", None) is not None else p
        local += held.to_local().numel() if hasattr(held, "to_local") else held.numel()
    print(
        "RESULT "
        + json.dumps(
            {
                "rank": dist.get_rank(),
                "peak_mib": (_rss_kib("VmHWM") - baseline) / 1024,
                "anon_mib": (anon.peak - baseline_anon) / 1024,
                "seconds": took,
                "local_params": local,
                "dtype": str(next(model.parameters()).dtype),
            }
        ),
        flush=True,
    )
    dist.destroy_process_group()


def _start(engine: str, mode: str, folder: str, ep: int):  # noqa: ANN202
    """The model as `engine` takes it after the start-up `mode` (see the module docstring); with no `mode`,
    only the imports."""
    import torch
    import torch.distributed as dist
    from transformers.integrations import HfDeepSpeedConfig

    from moe_recipes.config import Config
    from moe_recipes.distributed.expert_parallel import EPLayout, shard_experts
    from moe_recipes.engines.deepspeed_ep import create_groups
    from moe_recipes.engines.deepspeed_zero import deepspeed_config, partition_and_fill
    from moe_recipes.engines.fsdp2 import shard_and_fill
    from moe_recipes.models.inspect import inspect_model
    from moe_recipes.models.loading import load_model
    from moe_recipes.models.sharded_load import build_on_meta, materialise_and_fill

    if not mode:
        return None
    world = dist.get_world_size()
    cfg = Config()
    cfg.distributed.expert_parallel_size = ep
    if engine == "fsdp2":
        model = build_on_meta(folder) if mode == "sharded" else load_model(folder)
        weights = folder if mode == "sharded" else None
        shard_and_fill(model, model, cfg, inspect_model(model), torch.device("cpu"), weights)
        return model
    cfg.distributed.zero_stage = 3 if engine == "zero3" else 2
    cfg.train.micro_batch_size, cfg.train.global_batch_size = 1, world
    ds_config = deepspeed_config(cfg, world)
    if engine == "zero3":
        if mode == "partitioned":
            model = build_on_meta(folder)
            partition_and_fill(model, ds_config, folder)
            return model
        keep = HfDeepSpeedConfig(ds_config)  # noqa: F841 (transformers holds it weakly)
        return load_model(folder)
    model = build_on_meta(folder) if mode == "experts" else load_model(folder)
    if ep > 1:
        info = inspect_model(model)
        shard_experts(info, EPLayout(ep, dist.get_rank() % ep, info.num_experts), create_groups(ep))
    if mode == "experts":
        materialise_and_fill(model, model, folder, torch.device("cpu"))
    return model


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


def run(engine: str, mode: str, world: int, folder: Path, ep: int) -> list[dict]:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MALLOC_MMAP_THRESHOLD_": "65536",
        "MALLOC_TRIM_THRESHOLD_": "0",
    }
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", f"--master_port={_free_port()}",
        __file__, "--child", engine, mode, str(folder), "--ep", str(ep if world > 1 else 1),
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    decoder = json.JSONDecoder()  # a rank's line may run on into another rank's output
    rows = [decoder.raw_decode(part)[0] for part in out.stdout.split("RESULT ")[1:]]
    if out.returncode != 0 or len(rows) != world:
        raise RuntimeError(f"{engine} {mode} on {world} ranks failed:\n{out.stderr[-3000:]}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", nargs=3, metavar=("ENGINE", "MODE", "FOLDER"))
    parser.add_argument("--engine", choices=sorted(MODES), default="fsdp2")
    parser.add_argument("--ep", type=int, default=1, help="expert-parallel size on more than one rank")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--expert-width", type=int, default=512)
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.ep)
        return
    modes = MODES[args.engine] if args.engine != "zero2" or args.ep > 1 else ("whole",)
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
            f"# {args.engine}, EP {args.ep} on more than one rank; peak = VmHWM - resident set after imports, "
            f"largest rank; fp32 model {params * 4 / MIB:.0f} MiB"
        )
        print(
            "| engine | mode | ranks | peak MiB/rank | vs 1 rank | peak / fp32 model | heap peak / fp32 model "
            "| seconds | fp32 params held/rank |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for mode in modes:
            one = None
            for world in args.worlds:
                rows = run(args.engine, mode, world, folder, args.ep)
                peak = max(r["peak_mib"] for r in rows)
                heap = max(r["anon_mib"] for r in rows)
                one = one if one is not None else peak
                held = max(r["local_params"] for r in rows)
                secs = max(r["seconds"] for r in rows)
                print(
                    f"| {args.engine} | {mode} | {world} | {peak:.0f} | {peak / one:.2f}x | "
                    f"{peak / (params * 4 / MIB):.2f} | {heap / (params * 4 / MIB):.2f} | {secs:.1f} | "
                    f"{held / 1e6:.0f} M |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
