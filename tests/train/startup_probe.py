"""One rank of a start-up memory measurement: bring a model folder up as `train` does for ENGINE and print
this rank's peak resident set growth over the load as a JSON line. Used by test_plan_peak.py.

    python -m torch.distributed.run --nproc_per_node N -m tests.train.startup_probe ENGINE FOLDER

ENGINE: `zero2` (every rank loads the whole model: `load_model`), `fsdp2` (built on meta, sharded, each rank
reads its rows: `build_on_meta` + `shard_and_fill`), `zero3` (built on meta, partitioned, each rank reads the
rows of its partitions: `build_on_meta` + `partition_and_fill`) or `zero3-rank0` (ZeRO-3's fallback,
`load_model` under `HfDeepSpeedConfig`).
The baseline is the resident set after the imports and the process group, so what the load adds is measured.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def main(engine: str, folder: str) -> None:
    import deepspeed  # noqa: F401  (imported by a training run; counted in the baseline)
    import torch
    import torch.distributed as dist

    from moe_recipes.config import Config
    from moe_recipes.distributed.env import init_distributed
    from moe_recipes.engines.deepspeed_zero import partition_and_fill
    from moe_recipes.engines.fsdp2 import shard_and_fill
    from moe_recipes.models.inspect import inspect_model
    from moe_recipes.models.loading import load_model
    from moe_recipes.models.sharded_load import build_on_meta

    init_distributed(use_deepspeed=engine != "fsdp2")
    keep = []
    world = dist.get_world_size()
    ds = {"train_batch_size": world, "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    if engine == "zero3-rank0":
        from transformers.integrations import HfDeepSpeedConfig

        keep.append(HfDeepSpeedConfig(ds))
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from the resident set
    baseline = _status_bytes("VmRSS")
    if engine == "fsdp2":
        model = build_on_meta(folder)
        shard_and_fill(model, model, Config(), inspect_model(model), torch.device("cpu"), folder)
    elif engine == "zero3":
        partition_and_fill(build_on_meta(folder), ds, folder)
    else:
        model = load_model(folder)
    dist.barrier()
    growth = _status_bytes("VmHWM") - baseline
    print("RESULT " + json.dumps({"rank": dist.get_rank(), "growth": growth}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
