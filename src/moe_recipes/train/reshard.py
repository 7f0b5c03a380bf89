"""Resuming a DeepSpeed checkpoint on another number of processes, ZeRO stage or expert-parallel size.

DeepSpeed's ZeRO 1-3 files are cut for the run that wrote them: every rank's optimizer file holds its
partition of flat buffers whose layout depends on the process count, the stage and (with expert
parallelism) the EP size. DeepSpeed's own universal-checkpoint converter does not know our expert
parallelism (it handles its AutoEP layers only; ours are plain parameters holding a slice of the experts,
`engines.deepspeed_ep`), so the resharding goes through a layout of our own, written once next to the
checkpoint and read by any number of processes:

    SAVE/iter_NNNNNNN.resharded/
        params/<name>.pt     {"fp32", "exp_avg", "exp_avg_sq"}: the whole tensor of one trainable parameter
                             (all experts, whatever the EP size), its AdamW moments, in fp32
        buffers.pt           the module's persistent buffers (e.g. DeepSeek-V3's routing bias)
        resharded.json       written last: where it came from, AdamW's step, every file with its size

It is written by rank 0 into `iter_NNNNNNN.resharded.tmp/` and renamed when complete, so a conversion
cut short (kill -9, a full disk) leaves only a `.tmp` folder, which the next conversion removes; a
complete one is reused. Every rank then loads it into the engine it has already built: the module
weights, and the fp32 master partition and AdamW moments of the ZeRO optimizer (stage 0-3), each rank
taking its slice (its experts, its ZeRO partition) of memory-mapped whole tensors. AdamW's step is the
same for every parameter (one optimizer step per train step), so one number carries it. Frozen
parameters are not carried: they are the base model's (`model.path`), loaded at set-up.

The trainer removes the converted copy once the next checkpoint of the run is complete.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from moe_recipes.faults import fault_point
from moe_recipes.layout import RESHARDED_META, resharded_dir

MOMENTS = ("exp_avg", "exp_avg_sq")
KEYS = ("fp32", *MOMENTS)
MODEL_STATES = "mp_rank_00_model_states.pt"
_ZERO_MODEL = "zero_pp_rank_{rank}_mp_rank_00_model_states.pt"
_ZERO_OPTIM = "zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"


def describe(world: int, stage: int | None, ep: int) -> str:
    """'2 processes, ZeRO-2, EP 2' (EP left out when 1)."""
    parts = [f"{world} process{'es' if world != 1 else ''}"]
    if stage is not None:
        parts.append(f"ZeRO-{stage}")
    if ep > 1:
        parts.append(f"EP {ep}")
    return ", ".join(parts)


def layout_of(run_state: dict[str, Any]) -> tuple[int, int, int]:
    """(processes, ZeRO stage, EP size) a checkpoint was written with."""
    return (
        int(run_state.get("world_size", 1)),
        int(run_state.get("zero_stage") or 0),
        int(run_state.get("expert_parallel_size", 1)),
    )


def needs_reshard(run_state: dict[str, Any], world: int, stage: int, ep: int) -> bool:
    """Whether DeepSpeed's own loader cannot read this checkpoint into an engine of (world, stage, ep).

    ZeRO-0 without expert parallelism holds whole weights and optimizer states, so DeepSpeed loads it on
    any number of processes (at stage 0)."""
    written = layout_of(run_state)
    if written == (world, stage, ep):
        return False
    return not (written[1] == 0 and stage == 0 and written[2] == 1 and ep == 1)


def check_reshardable(ckpt: Path, run_state: dict[str, Any]) -> None:
    """ValueError when the checkpoint's layout is one this module cannot read (ZeRO-0)."""
    world, stage, ep = layout_of(run_state)
    if stage == 0:
        raise ValueError(
            f"{ckpt} was written with ZeRO stage 0 ({describe(world, stage, ep)}); it resumes with ZeRO-0 "
            "and expert_parallel_size=1 on any number of processes, or with its own layout: resharding a "
            "ZeRO-0 checkpoint to another stage or EP size is not supported (convert it to a Hugging Face "
            "folder and start from that)"
        )


# ---------------------------------------------------------------------------------------------- reading


def _load(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)


def _zero12_tensors(ckpt: Path, world: int, ep: int) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """(name, {fp32, exp_avg, exp_avg_sq}) of every trainable parameter of a ZeRO-1/2 checkpoint.

    Each rank's optimizer file holds, per param group, its partition of the group's flat fp32 buffer and
    of AdamW's moments, and `param_slice_mappings` says which part of which parameter each partition
    holds; a parameter is the concatenation of its fragments over the group's ranks in rank order. The
    groups of expert parameters (`moe` in their param group) are partitioned over the expert-data-parallel
    ranks of each EP rank (e, e + EP, ...): each EP rank's slice of the experts is gathered from those,
    and the whole tensor is the EP ranks' slices in order."""
    shapes = _load(ckpt / MODEL_STATES)["param_shapes"]
    optim = [_load(ckpt / _ZERO_OPTIM.format(rank=r))["optimizer_state_dict"] for r in range(world)]
    for g, group_shapes in enumerate(shapes):
        is_moe = bool(optim[0]["base_optimizer_state"]["param_groups"][g].get("moe"))
        ep_ranks = range(ep) if is_moe else range(1)
        rank_lists = [list(range(e, world, ep)) if is_moe else list(range(world)) for e in ep_ranks]
        for name, shape in group_shapes.items():
            out: dict[str, torch.Tensor] = {}
            for key in KEYS:
                slices = [
                    _gather_fragments(optim, ranks, g, name, key).reshape(shape) for ranks in rank_lists
                ]
                out[key] = torch.cat(slices) if len(slices) > 1 else slices[0]
            yield name, out


def _gather_fragments(optim: list[dict], ranks: list[int], g: int, name: str, key: str) -> torch.Tensor:
    parts = []
    for r in ranks:
        address = optim[r]["param_slice_mappings"][g].get(name)
        if address is None:
            continue
        if key == "fp32":
            flat = optim[r]["single_partition_of_fp32_groups"][g]
        else:
            flat = optim[r]["base_optimizer_state"]["state"][g][key]
        parts.append(flat.narrow(0, address.start, address.numel))
    return torch.cat(parts)


def _zero3_tensors(ckpt: Path, world: int) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """(name, {fp32, exp_avg, exp_avg_sq}) of every trainable parameter of a ZeRO-3 checkpoint.

    Every rank holds ceil(numel / world) elements of every parameter, one parameter after the other in
    the order of `param_shapes` (over its sub-groups); the moments are laid out like the fp32 weights."""
    shapes = _load(ckpt / _ZERO_MODEL.format(rank=0))["param_shapes"]
    flats: dict[str, list[torch.Tensor]] = {key: [] for key in KEYS}
    for r in range(world):
        osd = _load(ckpt / _ZERO_OPTIM.format(rank=r))["optimizer_state_dict"]
        groups = osd["fp32_flat_groups"]
        state = osd["optimizer_state_dict"]["state"]
        flats["fp32"].append(torch.cat(list(groups)))
        for key in MOMENTS:
            flats[key].append(torch.cat([state[i][key] for i in range(len(groups))]))
    offset = 0
    for name, shape in ((n, s) for group in shapes for n, s in group.items()):
        numel = shape.numel()
        part = -(-numel // world)
        yield (
            name,
            {
                key: torch.cat([f.narrow(0, offset, part) for f in flats[key]])[:numel].reshape(shape)
                for key in KEYS
            },
        )
        offset += part
    if offset != flats["fp32"][0].numel():
        raise ValueError(
            f"{ckpt}: the ZeRO-3 partitions hold {flats['fp32'][0].numel()} elements per rank, "
            f"the parameters account for {offset}"
        )


def _check_files(ckpt: Path, world: int, stage: int) -> None:
    """The DeepSpeed files this module reads are there (DeepSpeed's bf16 optimizer, which a
    distributed.deepspeed_config can turn on, writes others: `bf16_zero_pp_rank_...`)."""
    names = [_ZERO_OPTIM.format(rank=r) for r in range(world)]
    names += [_ZERO_MODEL.format(rank=0)] if stage == 3 else [MODEL_STATES]
    for name in names:
        if not (ckpt / name).is_file():
            raise ValueError(
                f"{ckpt} has no {name}: resharding reads the ZeRO files of DeepSpeed's fp32 optimizer "
                "(this project's default); resume it with the processes, ZeRO stage and EP size it was "
                "written with"
            )


def _step(ckpt: Path, world: int, stage: int) -> int:
    """AdamW's step count (the same for every parameter group)."""
    osd = _load(ckpt / _ZERO_OPTIM.format(rank=0))["optimizer_state_dict"]
    state = osd["optimizer_state_dict" if stage == 3 else "base_optimizer_state"]["state"]
    steps = {int(s["step"]) for s in state.values() if "step" in s}
    if len(steps) > 1:
        raise ValueError(f"{ckpt}: the optimizer's parameter groups are at different steps {sorted(steps)}")
    return steps.pop() if steps else 0


def _buffers(ckpt: Path, stage: int) -> dict[str, torch.Tensor]:
    model = _load(ckpt / (_ZERO_MODEL.format(rank=0) if stage == 3 else MODEL_STATES))
    module = model["module"]
    return {name: module[name].clone() for name in model.get("buffer_names", []) if name in module}


# ---------------------------------------------------------------------------------------------- writing


def is_complete(folder: Path) -> bool:
    """A converted folder whose resharded.json exists and whose files all have their recorded sizes."""
    meta = folder / RESHARDED_META
    if not meta.is_file():
        return False
    try:
        files = json.loads(meta.read_text())["files"]
    except (json.JSONDecodeError, KeyError):
        return False
    return all(
        (folder / rel).is_file() and (folder / rel).stat().st_size == size for rel, size in files.items()
    )


def convert(ckpt: Path, run_state: dict[str, Any]) -> tuple[Path, float, bool]:
    """Write `ckpt`'s resharded copy next to it (rank 0 only); returns (folder, seconds, reused).

    A complete copy from an earlier resume is reused; a `.tmp` left by an interrupted one is removed."""
    t0 = time.perf_counter()
    out = resharded_dir(ckpt)
    if is_complete(out):
        return out, time.perf_counter() - t0, True
    check_reshardable(ckpt, run_state)
    world, stage, ep = layout_of(run_state)
    _check_files(ckpt, world, stage)
    tmp = out.with_name(out.name + ".tmp")
    for stale in (tmp, out):  # `out` without a complete resharded.json: never finished
        if stale.exists():
            shutil.rmtree(stale)
    (tmp / "params").mkdir(parents=True)
    tensors = _zero3_tensors(ckpt, world) if stage == 3 else _zero12_tensors(ckpt, world, ep)
    iteration = int(run_state.get("iteration", -1))
    files: dict[str, int] = {}
    params: dict[str, list[int]] = {}
    for i, (name, values) in enumerate(tensors):
        rel = f"params/{name}.pt"
        torch.save({k: v.contiguous().clone() for k, v in values.items()}, tmp / rel)
        files[rel] = (tmp / rel).stat().st_size
        params[name] = list(values["fp32"].shape)
        if i == 0:
            fault_point("reshard_partial", iteration)  # one parameter written, the others not
    torch.save(_buffers(ckpt, stage), tmp / "buffers.pt")
    files["buffers.pt"] = (tmp / "buffers.pt").stat().st_size
    meta = {
        "source": ckpt.name,
        "written_by": {"world_size": world, "zero_stage": stage, "expert_parallel_size": ep},
        "step": _step(ckpt, world, stage),
        "params": params,
        "files": files,
    }
    with open(tmp / RESHARDED_META, "w") as f:
        f.write(json.dumps(meta, indent=1))
        f.flush()
        os.fsync(f.fileno())
    fault_point("reshard_before_rename", iteration)
    os.replace(tmp, out)
    return out, time.perf_counter() - t0, False


def convert_on_rank0(ckpt: Path, run_state: dict[str, Any]) -> tuple[Path, float, bool]:
    """`convert` on rank 0 while the other ranks wait in a collective (bounded by the process group's
    timeout, distributed.timeout_minutes); a failure on rank 0 stops every rank."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    result: tuple[Path, float, bool] = (resharded_dir(ckpt), 0.0, True)
    error: BaseException | None = None
    if rank == 0:
        try:
            result = convert(ckpt, run_state)
        except Exception as err:  # every rank must leave the wait below
            error = err
    if dist.is_initialized() and dist.get_world_size() > 1:
        flags = torch.tensor([float(error is not None), result[1], float(result[2])], dtype=torch.float64)
        dist.broadcast(flags, src=0)
        if error is None and flags[0].item():
            raise RuntimeError(f"rank 0 could not convert {ckpt} for resharding (its error says why)")
        result = (result[0], flags[1].item(), bool(flags[2].item()))
    if error is not None:
        raise error
    return result


# ---------------------------------------------------------------------------------------------- loading


@torch.no_grad()
def load_resharded(engine: Any, folder: Path) -> int:
    """Load the resharded copy `folder` into `engine` (every rank): weights, the ZeRO optimizer's fp32
    master partition and AdamW moments, buffers. Returns AdamW's step."""
    from moe_recipes.engines.deepspeed_ep import is_expert_param

    meta = json.loads((folder / RESHARDED_META).read_text())
    step = int(meta["step"])
    stage = engine.zero_optimization_stage()
    ep = getattr(engine, "expert_parallel_size", 1)
    ep_rank = dist.get_rank() % ep if dist.is_initialized() else 0
    opt = engine.optimizer
    expected = {1: "single_partition_of_fp32_groups", 2: "single_partition_of_fp32_groups"}
    expected[3] = "fp32_partitioned_groups_flat"
    if stage in expected and not hasattr(opt, expected[stage]):
        raise ValueError(
            f"resharding loads into DeepSpeed's ZeRO-{stage} fp32 optimizer, not {type(opt).__name__} "
            "(set by distributed.deepspeed_config?)"
        )
    base = opt.optimizer if stage > 0 else opt
    _init_adam_state(base, _stepped_tensors(opt, stage), step)
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        if name not in meta["params"]:
            raise ValueError(f"{folder} has no parameter {name} (it was written for another model?)")
        values = _load(folder / "params" / f"{name}.pt")
        if is_expert_param(p):  # this rank's experts
            lo = ep_rank * p.shape[0]
            values = {k: v[lo : lo + p.shape[0]] for k, v in values.items()}
        if stage == 3:
            _set_zero3(opt, p, values)
        else:
            if tuple(values["fp32"].shape) != tuple(p.shape):
                raise ValueError(
                    f"{folder}: {name} has shape {tuple(values['fp32'].shape)}, the model's is {tuple(p.shape)}"
                )
            p.data.copy_(values["fp32"])
            if stage == 0:
                for key in MOMENTS:
                    base.state[p][key].copy_(values[key])
            else:
                _set_zero12(opt, p, values)
    buffers = torch.load(folder / "buffers.pt", map_location="cpu", weights_only=False)
    for name, buf in engine.module.named_buffers():
        if name in buffers:
            buf.copy_(buffers[name])
    return step


def _stepped_tensors(opt: Any, stage: int) -> list[torch.Tensor]:
    """The tensors AdamW steps: the parameters at stage 0, the fp32 flat partitions at stages 1-3 (ZeRO-3
    puts each into its param group only while stepping it)."""
    if stage == 0:
        return [p for group in opt.param_groups for p in group["params"]]
    if stage == 3:
        return list(opt.fp32_partitioned_groups_flat)
    return list(opt.single_partition_of_fp32_groups)


def _init_adam_state(optimizer: torch.optim.Optimizer, tensors: list[torch.Tensor], step: int) -> None:
    """AdamW's state for `tensors` (zero moments at `step`), as torch creates it lazily at the first step;
    the moments are then filled in place."""
    for p in tensors:
        optimizer.state[p] = {
            "step": torch.tensor(float(step), dtype=torch.float32, device=p.device),
            "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
            "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
        }


def _set_zero12(opt: Any, p: torch.Tensor, values: dict[str, torch.Tensor]) -> None:
    """ZeRO 1/2: the part of `p` this rank's flat partition holds (DeepSpeed's `_hp_mapping`: where in the
    parameter, where in the partition), for the fp32 master weights and each moment."""
    mapping = getattr(p, "_hp_mapping", None)
    if mapping is None:  # no element of p in this rank's partition
        return
    lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
    partition = opt.single_partition_of_fp32_groups[mapping.param_group_index]
    targets = {"fp32": partition, **{k: opt.optimizer.state[partition][k] for k in MOMENTS}}
    for key, target in targets.items():
        target.narrow(0, hp.start, hp.numel).copy_(values[key].reshape(-1).narrow(0, lp.start, lp.numel))


def _set_zero3(opt: Any, p: torch.Tensor, values: dict[str, torch.Tensor]) -> None:
    """ZeRO-3: this rank's ceil(numel / world) elements of `p` (zero-padded at the end), into the
    parameter's partition, the fp32 master partition and each moment."""
    group_idx, offset, numel = opt.grad_position[opt.get_param_id(p)]
    rank = opt._get_param_partition_rank(p)
    if values["fp32"].numel() != p.ds_numel:
        raise ValueError(
            f"a parameter has {values['fp32'].numel()} elements in the checkpoint, {p.ds_numel} here"
        )
    fp32 = opt.fp32_partitioned_groups_flat[group_idx]
    targets = {"fp32": fp32, **{k: opt.optimizer.state[fp32][k] for k in MOMENTS}}
    for key, target in targets.items():
        flat = values[key].reshape(-1)
        part = torch.zeros(numel, dtype=flat.dtype)
        lo = rank * numel
        mine = flat[lo : lo + numel]
        part[: mine.numel()] = mine
        target.narrow(0, offset, numel).copy_(part)
        if key == "fp32":
            p.ds_tensor.data.copy_(part.to(p.ds_tensor.dtype))
