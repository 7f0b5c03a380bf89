"""Checkpoints that never lose work.

Layout of `SAVE/iter_NNNNNNN/`:
    engine files           model, optimizer (every rank's ZeRO partition), written by DeepSpeed; or with
                           distributed.engine=fsdp2 a torch.distributed.checkpoint (`.metadata`,
                           `__R_0.distcp` per rank) that any number of processes can load
    run_state.json         iteration, consumed samples, world size, ZeRO stage, schedule, base model
    rng_state_rank{R}.pt   Python, NumPy, torch (and CUDA) RNG states of every rank
    config.yaml            the resolved run config
    hf_config/             the base model's config.json, generation config and tokenizer files, so that
                           the checkpoint alone can be converted to a Hugging Face folder
and `SAVE/latest` holds the name of the newest complete checkpoint.

A checkpoint is written to `iter_NNNNNNN.tmp/`, renamed when every rank has finished, and only then is
`latest` replaced (atomically); old checkpoints are pruned after that (their run_state.json goes first, so a
half-deleted one never looks complete). A crash at any point leaves `latest` pointing at a complete
checkpoint; `clean_leftovers` removes what a crash left behind when the next run starts.

A DeepSpeed checkpoint resumed with another number of processes, ZeRO stage or EP size is first converted
to `iter_NNNNNNN.resharded/` next to it (`train.reshard`); copies in `SAVE` are removed once the next
checkpoint is complete.

run_state.json is written last, after every rank has finished, and lists every file of the checkpoint with
its size: a file cut short later (a copy, a full disk) is found when the checkpoint is opened, not deep in
loading it.

`MOE_RECIPES_FAULT` injects faults at the named points of a save (`moe_recipes.faults.SAVE_POINTS`), for
the fault-injection tests (tests/faults).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from moe_recipes.config import Config
from moe_recipes.faults import fault_point
from moe_recipes.fileio import exchange, folder_bytes, is_out_of_space, out_of_space_error
from moe_recipes.layout import (
    HF_FILES,
    ITER_RE,
    RESHARDED_META,
    RESHARDED_SUFFIX,
    iter_name,
    list_checkpoints,
)
from moe_recipes.train import reshard


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def write_atomic(path: Path, text: str, iteration: int = -1) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    if path.name == "latest":
        fault_point("latest_written", iteration)
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def clean_leftovers(save_dir: Path) -> list[str]:
    """Remove what an interrupted save, prune or resharding left in `save_dir` (call with the save lock held,
    rank 0): `iter_N.tmp` and `iter_N.resharded.tmp` folders, `iter_N` folders without run_state.json, a
    `latest.tmp`. Returns what it removed."""
    if not save_dir.is_dir():
        return []
    removed = []
    for p in sorted(save_dir.iterdir()):
        base = p.name[:-4].removesuffix(RESHARDED_SUFFIX)
        stale_tmp = p.name.endswith(".tmp") and (ITER_RE.match(base) or p.name == "latest.tmp")
        half_pruned = ITER_RE.match(p.name) and p.is_dir() and not (p / "run_state.json").is_file()
        if stale_tmp or half_pruned:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
            removed.append(p.name)
    return removed


def save_checkpoint(engine: Any, cfg: Config, iteration: int, run_state: dict[str, Any]) -> Path:
    """Save on every rank (collective). Returns the final checkpoint folder."""
    save_dir = Path(cfg.checkpoint.save)  # type: ignore[arg-type]
    name = iter_name(iteration)
    final, tmp = save_dir / name, save_dir / f"{name}.tmp"
    rank = _rank()
    if rank == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # left over from a crash during an earlier save
    _barrier()
    try:
        engine.save_checkpoint(str(save_dir), tag=tmp.name, save_latest=False)
        if cfg.checkpoint.save_hf:
            from moe_recipes.train.export import export_hf  # collective; rank 0 writes tmp/hf

            export_hf(engine, cfg, tmp / "hf")
        torch.save(rng_state(), tmp / f"rng_state_rank{rank}.pt")
        fault_point("engine_saved", iteration)
        if rank == 0:
            cfg.save(tmp / "config.yaml")
            _copy_hf_files(Path(cfg.model.path), tmp / "hf_config")
        _barrier()
        if rank == 0:  # last: its presence marks the checkpoint complete, and it lists every file
            files = _state_files(tmp)
            write_atomic(tmp / "run_state.json", json.dumps({**run_state, "files": files}, indent=2))
    except Exception as err:
        if not is_out_of_space(err):
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written stays behind; older ones are untouched
        previous = list_checkpoints(save_dir)
        raise out_of_space_error(err, tmp, folder_bytes(previous[-1]) if previous else None) from err
    if rank == 0:
        fault_point("before_rename", iteration)
        if not final.exists():
            os.replace(tmp, final)
        elif exchange(tmp, final):  # a checkpoint of this step from an earlier run, which `latest` may name:
            shutil.rmtree(tmp)  # swapped in one step, so `latest` never names a missing folder
        else:  # no atomic swap on this system: a crash in between leaves `latest` naming a missing folder
            shutil.rmtree(final)
            os.replace(tmp, final)
        fault_point("after_rename", iteration)
        write_atomic(save_dir / "latest", name + "\n", iteration)
        fault_point("after_latest", iteration)
        _prune(save_dir, cfg.checkpoint.keep_last_n, iteration)
        remove_resharded(save_dir)
    _barrier()
    return final


def _state_files(ckpt: Path) -> dict[str, int]:
    """{relative path: size} of the files a checkpoint's state lives in; the small text files a user may
    edit (config.yaml, hf_config/) are left out."""
    out = {}
    for p in sorted(ckpt.rglob("*")):
        rel = p.relative_to(ckpt)
        if p.is_file() and rel.parts[0] != "hf_config" and rel.name != "config.yaml":
            out[str(rel)] = p.stat().st_size
    return out


def _copy_hf_files(model_dir: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name in HF_FILES:
        src = model_dir / name
        if src.is_file():
            shutil.copy2(src, out / name)


def _prune(save_dir: Path, keep_last_n: int | None, iteration: int = -1) -> None:
    """Remove all but the newest `keep_last_n` complete checkpoints. run_state.json goes first, so that
    an interrupted removal leaves a folder that no reader takes for a checkpoint."""
    if not keep_last_n:
        return
    for old in list_checkpoints(save_dir)[:-keep_last_n]:
        (old / "run_state.json").unlink()
        fault_point("mid_prune", iteration)
        shutil.rmtree(old, ignore_errors=True)


def remove_resharded(save_dir: Path) -> None:
    """Remove the resharded copies (`train.reshard`) in `save_dir`: once a newer checkpoint is complete the
    run no longer needs them. resharded.json goes first, so a half-removed copy never looks complete."""
    for p in save_dir.glob(f"iter_*{RESHARDED_SUFFIX}"):
        if ITER_RE.match(p.name.removesuffix(RESHARDED_SUFFIX)) and p.is_dir():
            (p / RESHARDED_META).unlink(missing_ok=True)
            shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(engine: Any, ckpt: Path, seed: int = 0) -> dict[str, Any]:
    """Restore engine state and this rank's RNG state; returns run_state.

    A DeepSpeed checkpoint written with another process count, ZeRO stage or expert-parallel size is
    converted once to the resharded layout next to it and loaded from there (`train.reshard`); run_state
    then says so under `resharded` (where, how long) and `resume_note` (one line for the log)."""
    run_state = json.loads((ckpt / "run_state.json").read_text())
    world = dist.get_world_size() if dist.is_initialized() else 1
    written_by = run_state.get("engine", "deepspeed")
    engine_name = getattr(engine, "engine_name", "deepspeed")
    if written_by != engine_name:
        raise ValueError(
            f"{ckpt} was written by the {written_by} engine; it cannot be resumed with "
            f"distributed.engine={engine_name} (convert it to a Hugging Face folder and start from that)"
        )
    if written_by == "deepspeed":
        stage, ep = engine.zero_optimization_stage(), getattr(engine, "expert_parallel_size", 1)
        if reshard.needs_reshard(run_state, world, stage, ep):
            _load_resharded(engine, ckpt, run_state, (world, stage, ep))
            _restore_rng(ckpt, run_state, seed)
            return run_state
    load_path, _ = engine.load_checkpoint(
        str(ckpt.parent), tag=ckpt.name, load_optimizer_states=True, load_lr_scheduler_states=False
    )
    if load_path is None:
        raise FileNotFoundError(f"DeepSpeed could not load the checkpoint in {ckpt}")
    _restore_rng(ckpt, run_state, seed)
    return run_state


def _load_resharded(engine: Any, ckpt: Path, run_state: dict[str, Any], now: tuple[int, int, int]) -> None:
    folder, seconds, reused = reshard.convert_on_rank0(ckpt, run_state)
    step = reshard.load_resharded(engine, folder)
    engine.global_steps = int(run_state["iteration"])  # DeepSpeed's own counters, as its loader sets them
    engine.global_samples = int(run_state["consumed_samples"])
    how = f"reused {folder}" if reused else f"converted to {folder} in {seconds:.1f} s"
    run_state["resharded"] = {"folder": str(folder), "seconds": seconds, "reused": reused, "adam_step": step}
    run_state["resume_note"] = (
        f"checkpoint written by {reshard.describe(*reshard.layout_of(run_state))}; "
        f"resumed on {reshard.describe(*now)}: {how}"
    )


def derived_seed(seed: int, iteration: int, rank: int) -> int:
    """The seed of a rank that has no RNG state in the checkpoint (a resume on more processes than wrote
    it): a fixed function of train.seed, the step and the rank, so the same resume gives the same streams."""
    return ((seed * 1_000_003 + iteration) * 1_000_003 + rank) % 2**32


def _restore_rng(ckpt: Path, run_state: dict[str, Any], seed: int) -> None:
    """This rank's saved RNG states; a rank the checkpoint's run did not have gets `derived_seed` for
    Python, NumPy and torch."""
    rank = _rank()
    rng_file = ckpt / f"rng_state_rank{rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
        return
    derived = derived_seed(seed, int(run_state.get("iteration", 0)), rank)
    random.seed(derived)
    np.random.seed(derived)
    torch.manual_seed(derived)
