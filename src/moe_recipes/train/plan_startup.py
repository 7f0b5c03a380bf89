"""Start-up memory per rank: what loading the model holds on the host and on the GPU, for each engine.

The step plan (`train.plan`) is the steady state; before it, each engine loads the model in its own way,
and at real size that can be the larger peak. How an engine starts is one named `StartMode`, chosen by
`start_mode(cfg)` for `plan` and by `training_start` (the same choice, with the folder as it is) for `train`;
the bytes follow from the mode alone (`startup_peak`). The modes:

* `SHARDED` (FSDP2, with or without expert parallelism, from safetensors, without CPU offload:
  `models.sharded_load`): the model is built on ``meta`` and sharded, each rank allocates only its fp32 shards
  on its GPU and reads only their rows of the checkpoint through a memory map, copying them straight into
  the shards (converted to fp32 by the copy). Host: the mapped pages of what it has read since the maps
  were last dropped (every 64 MiB read, `sharded_load.MAP_WINDOW`): at most 64 MiB plus one read, or its
  1/N of the checkpoint if that is less. GPU: its fp32 shards.
* `RANK0_SCATTER` (FSDP2, with or without expert parallelism, from ``.bin`` weights only, without CPU offload:
  `models.scatter_load`): built on ``meta`` and sharded as `SHARDED`; rank 0 alone opens the torch files
  (memory-mapped, one at a time), builds each in-memory tensor whole and sends every rank its rows, which it
  receives straight into its shards. Host: on rank 0 the pages of one mapped file (at most the whole
  checkpoint: a single ``pytorch_model.bin`` is touched whole while it is open) plus one whole fp32 tensor
  (the largest in-memory one: a layer's fused experts in an MoE); the others nothing model-sized. GPU: the fp32 shards,
  plus on rank 0 that one tensor, sent from its GPU.
* `PARTITIONED` (DeepSpeed ZeRO-3 from safetensors, its parameters plain fp32: `engines.deepspeed_zero.partition_and_fill`):
  built on ``meta``; every parameter becomes a ZeRO-3 parameter holding only its flat 1/N partition, filled
  from the file rows that cover it. Host and GPU as `SHARDED` (the partitions on the host with
  ``offload_params``).
* `EXPERTS` (DeepSpeed ZeRO 0-2 with expert parallelism, from safetensors: `engines.deepspeed_ep`):
  built on ``meta``, the routed experts cut to this rank's 1/E, then everything it holds (the dense part and
  its experts) materialised on its GPU and read. Host: as `SHARDED`, of those bytes. GPU: the dense part and
  1/E of the routed experts, fp32.
* `WHOLE` (DeepSpeed ZeRO 0-2 without expert parallelism, which replicate the model by design; FSDP2 with CPU
  offload; DeepSpeed EP without safetensors: `models.loading.load_model`): every rank runs
  ``from_pretrained`` in fp32 on the host, then moves the whole model to its GPU, where the engine keeps it
  (ZeRO 0-2), cuts it (expert parallelism) or shards it (FSDP2). Host: the whole fp32 model plus the pages
  of the whole checkpoint, mapped while it is read (released checkpoints are bf16: 6 bytes a parameter; for
  fp32 files transformers keeps some tensors on the mapped pages, so 8 bytes a parameter is an upper bound),
  plus one layer's experts fused from the per-expert file tensors. GPU: the whole fp32 model.
* `RANK0_READS` (DeepSpeed ZeRO-3 where `PARTITIONED` does not apply: no safetensors, or a DeepSpeed JSON
  with half-precision, NVMe-swapped, hpZ or quantized parameters: ``from_pretrained`` under
  ``HfDeepSpeedConfig``, transformers 5): each parameter is partitioned as it is built; rank 0 alone reads
  the checkpoint (the other ranks read it as ``meta``) and fills the partitions one module at a time, every
  rank gathering that module. Host: on rank 0 the pages of the whole checkpoint plus one layer's experts
  fused; the others hold no model-sized buffer (their partitions with ``offload_params``). GPU: the fp32
  partition plus one gathered module (a layer's fused experts, or the largest tensor).

Checked on CPU (tests/train/test_plan_peak.py: an 86 M-parameter Qwen3-MoE saved in bf16, peak RSS over the
load minus the resident set before it; there the GPU's bytes are host bytes too, `StartupPeak.on_cpu`).

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
    said: str = ""  # what the trainer's start-up line says it did ("" : the whole load's own words)


SHARDED = StartMode(
    "sharded",
    "meta, own rows read",
    "built on meta; each rank allocates its fp32 shards on its GPU and reads only their rows",
    "built on meta, each rank read only its shards",
)
PARTITIONED = StartMode(
    "partitioned",
    "meta, own partition",
    "built on meta; each rank allocates its fp32 ZeRO-3 partitions and reads only the rows that cover them",
    "built on meta, partitioned by ZeRO-3, each rank read only its partition",
)
EXPERTS = StartMode(
    "experts",
    "meta, own experts",
    "built on meta; experts cut to 1/E, each rank allocates the dense part and its experts and reads them",
    "built on meta, each rank read only its experts and the replicated rest",
)
WHOLE = StartMode(
    "whole",
    "whole load per rank",
    "every rank loads the whole model in fp32 on the host (from_pretrained), then moves it to its GPU",
)
RANK0_SCATTER = StartMode(
    "rank0_scatter",
    "meta, rank 0 sends rows",
    "built on meta and sharded; rank 0 reads the .bin weights one tensor at a time and sends each rank its rows",
    "built on meta, rank 0 read the .bin weights one tensor at a time and sent each rank its shards",
)
RANK0_READS = StartMode(
    "rank0_reads",
    "rank 0 reads all",
    "from_pretrained under HfDeepSpeedConfig: partitioned as built; rank 0 reads the whole checkpoint and "
    "fills every partition, one module at a time",
)


def start_mode(cfg: Config, safetensors: bool = True, ds_config: dict[str, Any] | None = None) -> StartMode:
    """How `train` starts the engine of `cfg`; `safetensors`: whether the model folder holds safetensors
    weights (the starts from meta read only those); `ds_config`: the DeepSpeed JSON, or None for the keys of
    `distributed.deepspeed_config` (`sharded_load.whole_load_reason`)."""
    from moe_recipes.models.sharded_load import whole_load_reason

    d = cfg.distributed
    from_meta = whole_load_reason(cfg, safetensors, ds_config) is None
    if d.engine == "fsdp2":
        return SHARDED if from_meta else WHOLE if d.fsdp_cpu_offload else RANK0_SCATTER
    if d.expert_parallel_size > 1:
        return EXPERTS if from_meta else WHOLE
    if d.zero_stage == 3:
        return PARTITIONED if from_meta else RANK0_READS
    return WHOLE  # ZeRO 0-2 without expert parallelism replicate the model: load it whole


def training_start(cfg: Config, ds_config: dict[str, Any] | None = None) -> StartMode:
    """`start_mode` for the model folder as it is, for `train`; where a start from meta does not apply, one
    line says why every rank loads the whole model first."""
    from moe_recipes.models.sharded_load import has_safetensors, whole_load_reason

    safetensors = has_safetensors(cfg.model.path)
    mode = start_mode(cfg, safetensors, ds_config)
    why = whole_load_reason(cfg, safetensors, ds_config)
    if mode is RANK0_SCATTER:
        print(
            f"[moe-recipes] {cfg.model.path} holds no safetensors weights: built on meta and sharded, rank 0 "
            "reads the .bin weights one tensor at a time and sends each rank its rows",
            flush=True,
        )
    elif mode in (WHOLE, RANK0_READS) and why is not None:
        d = cfg.distributed
        then = (
            "sharding"
            if d.engine == "fsdp2"
            else "cutting the experts"
            if d.expert_parallel_size > 1
            else "partitioning"
        )
        if not safetensors and cfg.distributed.engine != "fsdp2":
            why += "; only FSDP2 starts from .bin weights by rank 0 sending each rank its rows"
        print(f"[moe-recipes] loading the whole model on every rank before {then} ({why})", flush=True)
    return mode


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


def _mapped(share: int, one_read: int) -> int:
    """The checkpoint pages a rank keeps mapped while reading `share` bytes, one read of at most `one_read`
    bytes at a time: the reader drops its maps every `MAP_WINDOW` bytes read."""
    from moe_recipes.models.sharded_load import MAP_WINDOW

    return min(share, MAP_WINDOW + one_read)


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
    if mode in (SHARDED, PARTITIONED):
        out.host[f"checkpoint pages mapped (of its 1/{shard}, dropped every 64 MiB read)"] = _mapped(
            ck // shard, ck * math.ceil(big / shard) // max(p, 1)
        )
        held = out.host if mode is PARTITIONED and d.offload_params else out.device
        held[f"fp32 {'partitions' if mode is PARTITIONED else 'shards'} (1/{shard})"] = 4 * p // shard
        # ranks of a node read different rows (the same ones where hybrid groups share the node): the node's
        # page cache holds what they read, once (the mapped pages are some of those); private: offloaded
        private = out.host_total - next(iter(out.host.values()))
        out.host_per_node = ck * min(ranks_here, shard) // shard + ranks_here * private
    elif mode is RANK0_SCATTER:
        shards = 4 * p // shard
        out.host["pages of one mapped .bin file (at most the whole checkpoint)"] = ck
        # the largest in-memory tensor (fused experts are one tensor): built whole on the host, sent from the GPU
        out.host["one whole tensor, fp32 (the largest, built from its file tensors)"] = 4 * big
        out.device[f"fp32 shards (1/{shard})"] = shards
        out.device["one whole tensor, fp32 (rank 0 sends its rows)"] = 4 * big
        out.host_other_ranks = 0
        out.host_per_node = out.host_total
    elif mode is EXPERTS:
        ep, routed = d.expert_parallel_size, shape.routed_expert_params
        own = p - routed + routed // ep  # the dense part and 1/E of the routed experts
        out.host["checkpoint pages mapped (of its dense part and experts, dropped every 64 MiB read)"] = (
            _mapped(ck * own // max(p, 1), ck * big // max(p, 1) // ep)
        )
        out.device[f"fp32 dense part and 1/{ep} of the routed experts"] = 4 * own
        pages = ck * (p - routed) // max(p, 1) + ck * routed * min(ranks_here, ep) // max(p * ep, 1)
        out.host_per_node = pages  # the page cache of what the node's ranks read, once; nothing private
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
