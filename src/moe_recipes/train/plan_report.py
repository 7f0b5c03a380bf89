"""What `moe-recipes plan` prints, and the start-up check of `train` built on the same plan."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from moe_recipes.config import Config
from moe_recipes.train.plan import GIB, HEADROOM, Hardware, MemoryPlan, plan


def _gib(n: float) -> str:
    return f"{n / GIB:8.2f} GiB"


def format_plan(p: MemoryPlan, assumed: str = "") -> str:
    """A table of the per-rank memory by kind, the model's size and the verdict."""
    m, hw = p.model, p.hardware
    lines = [
        f"hardware: {hw.nodes} node(s) x {hw.gpus_per_node} GPU(s) of {hw.gpu_memory_gb:g} GiB"
        + (f" ({assumed})" if assumed else ""),
        f"engine:   {p.engine}, micro batch {p.tokens_per_micro_batch} tokens, accumulation {p.grad_accum}",
        f"model:    {m.total_params / 1e9:.2f}B parameters ({m.trainable_params / 1e9:.2f}B trainable), "
        f"{m.active_params / 1e9:.2f}B active per token ({m.active_non_embedding / 1e9:.2f}B without the "
        f"embedding), {m.flops_per_token / 1e9:.1f} GFLOP/token (training), "
        f"{m.num_experts} experts top-{m.top_k}",
        "",
        "per GPU:",
    ]
    width = max(len(k) for k in [*p.device, *p.host, "total"])
    lines += [f"  {k:<{width}}  {_gib(v)}" for k, v in p.device.items()]
    lines.append(f"  {'total':<{width}}  {_gib(p.device_total)}")
    if p.host:
        lines += ["", "offloaded to CPU memory, per GPU:"]
        lines += [f"  {k:<{width}}  {_gib(v)}" for k, v in p.host.items()]
    verdict = "fits" if p.fits else "DOES NOT FIT"
    lines += [
        "",
        f"{verdict}: {p.device_total / GIB:.1f} GiB of {hw.gpu_memory_gb:g} GiB per GPU "
        f"(usable {p.usable_bytes / GIB:.1f} GiB after {HEADROOM:.0%} headroom for the CUDA context, "
        "NCCL buffers and fragmentation)",
    ]
    lines += [f"note: {n}" for n in p.notes]
    if p.startup is not None:
        lines += ["", *_startup_lines(p, width)]
    return "\n".join(lines)


def _startup_lines(p: MemoryPlan, width: int) -> list[str]:
    """The configured engine's start-up peak by kind, then every engine's, one line each."""
    s, gpus = p.startup, p.hardware.gpus_per_node
    assert s is not None
    width = max(width, *(len(k) + 2 for k in [*s.host, *s.device]))
    lines = ["start-up (loading the model, before the first step), per rank:", f"  how: {s.how}"]
    rank = " (rank 0)" if s.host_other_ranks is not None else ""
    lines += [f"  host{rank}:"] + [f"    {k:<{width - 2}}  {_gib(v)}" for k, v in s.host.items()]
    lines.append(f"    {'total':<{width - 2}}  {_gib(s.host_total)}")
    if s.host_other_ranks is not None:
        lines.append(f"    {'other ranks, total':<{width - 2}}  {_gib(s.host_other_ranks)}")
    lines.append(f"    {f'one node of {gpus} GPUs (file pages once)':<{width - 2}}  {_gib(s.host_per_node)}")
    lines += ["  GPU:"] + [f"    {k:<{width - 2}}  {_gib(v)}" for k, v in s.device.items()]
    verdict = "fits" if p.startup_fits else "DOES NOT FIT"
    lines += [
        f"  start-up {verdict}: {s.device_total / GIB:.1f} GiB of {p.usable_bytes / GIB:.1f} GiB usable per GPU",
        f"  the model in training: {s.in_training}",
        f"  checkpoint: {p.model.checkpoint_bytes / GIB:.2f} GiB ({p.model.checkpoint_source})",
        "",
        "start-up peak per rank, by engine (this model, these GPUs; * the configured one):",
        f"  {'engine':<36} {'host GiB':>9} {'GPU GiB':>8} {'node GiB':>9}  {'start':<20} in training",
    ]
    rows = [s, *p.startup_by_engine]
    for row in rows:
        host = f"{row.host_total / GIB:.1f}" + ("*" if row.host_other_ranks is not None else " ")
        lines.append(
            f"{'*' if row is s else ' '} {row.engine:<36} {host:>9} {row.device_total / GIB:>8.1f} "
            f"{row.host_per_node / GIB:>8.1f}   {row.short:<20} {row.in_training}"
        )
    if any(row.host_other_ranks is not None for row in rows):
        lines.append("  host*: rank 0's; the other ranks hold no model-sized buffer on the host")
    return lines


def format_json(p: MemoryPlan, assumed: str = "") -> str:
    return json.dumps({**p.to_dict(), "assumed": assumed}, indent=2)


def device_memory_bytes(device: torch.device) -> int:
    """Memory of one accelerator, or of the whole machine (its RAM) for the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def warn_if_over_memory(cfg: Config, model_config: Any, world_size: int, device: torch.device) -> str | None:
    """A warning when the plan of ``cfg`` on ``world_size`` ranks exceeds the memory ``device`` has.

    On CPU every rank of this machine (LOCAL_WORLD_SIZE, else ``world_size``) shares the RAM, so each
    gets its share. Returns None when the plan fits, or when the model cannot be planned (missing folder,
    unknown architecture: loading the model reports those better); never raises.
    """
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", world_size)) if device.type == "cpu" else 1
    memory = device_memory_bytes(device) / max(ranks_here, 1)
    try:
        p = plan(cfg, model_config, Hardware(gpus_per_node=world_size, gpu_memory_gb=memory / GIB))
    except Exception:  # the planner must never stop a run: it only advises
        return None
    notes = []
    if not p.fits:
        notes.append(
            f"[moe-recipes] warning: the memory plan needs {p.device_total / GIB:.1f} GiB per rank but "
            f"{device.type} has {memory / GIB:.1f} GiB per rank ({p.engine}); the run may run out of memory. "
            "`moe-recipes plan` shows the breakdown"
        )
    start = p.startup
    # on a CPU the GPU's bytes are host bytes: count what a rank holds there
    need = 0 if start is None else start.on_cpu() if device.type == "cpu" else start.device_total
    if need > memory:
        notes.append(
            f"[moe-recipes] warning: loading the model needs {need / GIB:.1f} GiB per rank ({start.short}: "
            f"{start.how}) but {device.type} has {memory / GIB:.1f} GiB per rank; the start-up may run out of "
            "memory. `moe-recipes plan` compares the engines' start-up"
        )
    return "\n".join(notes) or None
