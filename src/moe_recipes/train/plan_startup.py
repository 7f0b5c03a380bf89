"""Start-up memory per rank: what loading the model holds on the host and on the GPU, for each engine.

The step plan (`train.plan`) is the steady state; before it, each engine loads the model in its own way,
and at real size that can be the larger peak. How an engine starts is one named `StartMode`, chosen by
`start_mode(cfg)`; the bytes follow from the mode alone (`startup_peak`), so when an engine's start changes
(ZeRO-3 and DeepSpeed expert parallelism are being made partition-aware) only `start_mode` changes. Today:

* `SHARDED` (FSDP2, with or without expert parallelism, from safetensors, without CPU offload:
  `models.sharded_load`): the model is built on ``meta`` and sharded, each rank allocates only its fp32 shards
  on its GPU and reads only their rows of the checkpoint through a memory map. Host: the file pages of its
  1/N of the checkpoint, in the checkpoint's dtype, plus one slice converted to fp32 at a time (at most its
  shard of the largest tensor). GPU: its fp32 shards.
* `WHOLE` (DeepSpeed ZeRO 0-2 with or without expert parallelism, and FSDP2 with CPU offload or without
  safetensors: `models.loading.load_model`): every rank runs ``from_pretrained`` in fp32 on the host, then
  moves the whole model to its GPU, where the engine keeps it (ZeRO 0-2), cuts it (expert parallelism) or
  shards it (FSDP2). Host: the whole fp32 model plus the pages of the whole checkpoint, mapped while it is
  read (released checkpoints are bf16: 6 bytes a parameter; for fp32 files transformers keeps some
  tensors on the mapped pages, so 8 bytes a parameter is an upper bound), plus one layer's experts fused
  from the per-expert file tensors. GPU: the whole fp32 model.
* `RANK0_READS` (DeepSpeed ZeRO-3: ``from_pretrained`` under ``HfDeepSpeedConfig``, transformers 5): each
  parameter is partitioned as it is built; rank 0 alone reads the checkpoint (the other ranks read it as
  ``meta``) and fills the partitions one module at a time, every rank gathering that module. Host: on rank 0
  the pages of the whole checkpoint plus one layer's experts fused; the others hold no model-sized buffer
  (their partitions with ``offload_params``). GPU: the fp32 partition plus one gathered module (a layer's
  fused experts, or the largest tensor).

Checked on CPU (tests/train/test_plan_peak.py: an 86 M-parameter Qwen3-MoE saved in bf16, peak RSS over the
load minus the resident set before it; there the GPU's bytes are host bytes too, `StartupPeak.on_cpu`):
ZeRO-2 on 1 rank measured 537 MiB (estimate 525), FSDP2 on 2 ranks 294 MiB per rank (278), ZeRO-3 on 2 ranks
436 MiB on rank 0 (423) and 302 MiB on rank 1 (227: more than the partition and one gathered module is held
there, which the estimate does not explain).

Ranks of one node share the page cache: a file page read by several ranks is in memory once, while fp32
copies are each rank's own. So the per-node figure counts each rank's private bytes and the file pages once.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moe_recipes.config import Config


@dataclass(frozen=True)
class StartMode:
    """How training brings the model up on every rank (see the module docstring)."""

    key: str
    short: str  # a few words, for the table of engines
    how: str  # one line, for the report


SHARDED = StartMode(
    "sharded",
    "meta, own rows read",
    "built on meta; each rank allocates its fp32 shards on its GPU and reads only their rows",
)
WHOLE = StartMode(
    "whole",
    "whole load per rank",
    "every rank loads the whole model in fp32 on the host (from_pretrained), then moves it to its GPU",
)
RANK0_READS = StartMode(
    "rank0_reads",
    "rank 0 reads all",
    "from_pretrained under HfDeepSpeedConfig: partitioned as built; rank 0 reads the whole checkpoint and "
    "fills every partition, one module at a time",
)


def start_mode(cfg: Config, safetensors: bool = True) -> StartMode:
    """How `train` starts the engine of `cfg` today; `safetensors`: whether the model folder holds
    safetensors weights (FSDP2 needs them to start sharded). Change this when an engine's start changes."""
    from moe_recipes.models.sharded_load import whole_load_reason

    d = cfg.distributed
    if d.engine == "fsdp2":
        return SHARDED if whole_load_reason(cfg, safetensors) is None else WHOLE
    if d.zero_stage == 3:
        return RANK0_READS
    return WHOLE  # ZeRO 0-2, with or without expert parallelism: load whole, then keep or cut


def model_in_training(cfg: Config, world: int, shard: int) -> str:
    """How the engine holds the model's parameters once training runs: replicated or split, and over how many."""
    d = cfg.distributed
    ep = d.expert_parallel_size
    if d.engine == "fsdp2":
        split = f"sharded 1/{shard}" + (
            f", replicated across {world // shard} groups" if shard < world else ""
        )
        return split + (f" (routed experts cut 1/{ep} first)" if ep > 1 else "")
    if d.zero_stage == 3:
        return f"partitioned 1/{world}"
    if ep > 1:
        return f"replicated: dense parameters and 1/{ep} of the routed experts on every rank"
    return "replicated: the whole model on every rank"


@dataclass
class StartupPeak:
    """Bytes one rank holds at the peak of the model load, by kind, on the host and on its GPU."""

    engine: str
    mode: str  # StartMode.key
    short: str
    how: str
    in_training: str  # model_in_training
    host: dict[str, int] = field(default_factory=dict)  # the busiest rank (rank 0 where ranks differ)
    device: dict[str, int] = field(default_factory=dict)
    host_other_ranks: int | None = None  # the other ranks' host peak, where it differs from `host`
    host_per_node: int = 0  # one node's physical host memory: its ranks' private bytes, file pages once

    @property
    def host_total(self) -> int:
        return sum(self.host.values())

    @property
    def device_total(self) -> int:
        return sum(self.device.values())

    @property
    def replicates(self) -> bool:
        """Whether every rank holds the whole model in training (with EP: the dense part and its experts)."""
        return self.in_training.startswith("replicated")

    def on_cpu(self, rank0: bool = True) -> int:
        """What one rank holds when its "GPU" is the host (a CPU run), as measured by its peak RSS: the
        whole load's move to the device is then no copy; every other mode's device bytes are host bytes."""
        host = self.host_total if rank0 or self.host_other_ranks is None else self.host_other_ranks
        return host if self.mode == WHOLE.key else host + self.device_total


def checkpoint_bytes(model_config: Any, params: int, config_dtype: Any) -> tuple[int, str]:
    """(bytes of the model's weight files, how that was known): the safetensors files' sizes when
    `model_config` is a folder that holds them, else `params` times the size of the config's dtype."""
    if isinstance(model_config, (str, Path)):
        files = sorted(Path(model_config).glob("*.safetensors"))
        if files:
            return sum(f.stat().st_size for f in files), f"{len(files)} safetensors file(s)"
    dtype = _torch_dtype(config_dtype)
    if dtype is None:
        return 4 * params, "config.json names no dtype: fp32 assumed"
    name = str(dtype).removeprefix("torch.")
    return params * dtype.itemsize, f"{name}, config.json's dtype"


def _torch_dtype(value: Any) -> torch.dtype | None:
    """config.dtype as transformers gives it: a torch.dtype, a string such as "bfloat16", or None."""
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        found = getattr(torch, value.removeprefix("torch."), None)
        return found if isinstance(found, torch.dtype) else None
    return None


def startup_peak(
    cfg: Config, shape: Any, world: int, gpus_per_node: int, safetensors: bool = True
) -> StartupPeak:
    """The start-up peak of `cfg`'s engine for a model of `shape` (`train.plan.ModelShape`) on `world` GPUs."""
    from moe_recipes.train.plan import engine_name

    d = cfg.distributed
    shard = (d.fsdp_shard_size or world) if d.engine == "fsdp2" else world
    mode = start_mode(cfg, safetensors)
    p, ck, big = shape.total_params, shape.checkpoint_bytes, shape.largest_tensor
    name = engine_name(cfg, shard, world)
    out = StartupPeak(name, mode.key, mode.short, mode.how, model_in_training(cfg, world, shard))
    ranks_here = min(gpus_per_node, world)
    # one module's tensors at a time: the fused experts of a layer, which a loader builds from per-expert file
    # tensors (in the checkpoint's dtype) and ZeRO-3 gathers whole, or the largest single tensor
    module = max(big, shape.largest_layer_expert_params)
    converted = ck * module // max(p, 1)
    if mode is SHARDED:
        out.host[f"checkpoint pages of its 1/{shard} (memory-mapped)"] = ck // shard
        out.host["one slice converted to fp32"] = 4 * math.ceil(big / shard)
        out.device[f"fp32 shards (1/{shard})"] = 4 * p // shard
        # ranks of a node read different rows (the same ones where hybrid groups share the node)
        pages = ck * min(ranks_here, shard) // shard
        out.host_per_node = pages + ranks_here * out.host["one slice converted to fp32"]
    elif mode is WHOLE:
        out.host["whole model, fp32 (from_pretrained)"] = 4 * p
        out.host["whole checkpoint's pages (memory-mapped while read)"] = ck
        out.host["one module's experts fused (checkpoint dtype)"] = converted
        out.device["whole model, fp32 (moved before the engine keeps, cuts or shards it)"] = 4 * p
        out.host_per_node = ranks_here * (4 * p + converted) + ck
    else:
        partition = 4 * p // world
        out.host["whole checkpoint's pages (rank 0 reads it all)"] = ck
        out.host["one module's experts fused (checkpoint dtype)"] = converted
        (out.host if d.offload_params else out.device)[f"fp32 partition (1/{world})"] = partition
        out.device["one module gathered (fp32)"] = 4 * module
        out.host_other_ranks = partition if d.offload_params else 0
        out.host_per_node = out.host_total + (ranks_here - 1) * out.host_other_ranks
    return out


def startup_by_engine(
    cfg: Config, shape: Any, world: int, gpus_per_node: int, safetensors: bool = True
) -> list[StartupPeak]:
    """`startup_peak` of the configured engine first, then of FSDP2 and each ZeRO stage (those that differ),
    without offload or hybrid sharding, with the config's expert parallelism where the engine takes it (not
    ZeRO-3)."""
    rows = [startup_peak(cfg, shape, world, gpus_per_node, safetensors)]
    variants: list[tuple[str, int]] = [("fsdp2", 0), *(("deepspeed", stage) for stage in range(4))]
    for engine, stage in variants:
        d = cfg.distributed
        if engine == d.engine and (engine == "fsdp2" or stage == d.zero_stage):
            continue
        other = copy.deepcopy(cfg)
        o = other.distributed
        o.engine, o.zero_stage = engine, stage
        # the other engines as they start without offload or hybrid sharding
        o.offload_optimizer = o.offload_params = o.fsdp_cpu_offload = False
        o.fsdp_shard_size = None
        if engine == "deepspeed" and stage == 3:
            o.expert_parallel_size = 1  # ZeRO-3 does not take expert parallelism
        rows.append(startup_peak(other, shape, world, gpus_per_node, safetensors))
    return rows
