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
`latest` replaced (atomically); old checkpoints are pruned after that. A crash at any point leaves
`latest` pointing at a complete checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from moe_recipes.config import Config

ITER_RE = re.compile(r"^iter_(\d{7,})$")
HF_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "LICENSE",
    "README.md",
)


def iter_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
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


def list_checkpoints(save_dir: Path) -> list[Path]:
    """Complete checkpoints in `save_dir`, oldest first."""
    if not save_dir.is_dir():
        return []
    found = [p for p in save_dir.iterdir() if ITER_RE.match(p.name) and (p / "run_state.json").is_file()]
    return sorted(found, key=lambda p: int(ITER_RE.match(p.name).group(1)))  # type: ignore[union-attr]


def resolve_checkpoint(path: str | Path) -> Path | None:
    """`SAVE` (via its `latest` pointer) or `SAVE/iter_NNNNNNN` -> that complete checkpoint, else None."""
    path = Path(path)
    if ITER_RE.match(path.name):
        if not (path / "run_state.json").is_file():
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no run_state.json)")
        return path
    latest = path / "latest"
    if not latest.is_file():
        return None
    target = path / latest.read_text().strip()
    if not (target / "run_state.json").is_file():
        raise FileNotFoundError(f"{latest} points at {target.name}, which is not a complete checkpoint")
    return target


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
    engine.save_checkpoint(str(save_dir), tag=tmp.name, save_latest=False)
    if cfg.checkpoint.save_hf:
        from moe_recipes.convert.export import export_hf  # collective; rank 0 writes tmp/hf

        export_hf(engine, cfg, tmp / "hf")
    torch.save(rng_state(), tmp / f"rng_state_rank{rank}.pt")
    if rank == 0:
        cfg.save(tmp / "config.yaml")
        _copy_hf_files(Path(cfg.model.path), tmp / "hf_config")
        write_atomic(tmp / "run_state.json", json.dumps(run_state, indent=2))
    _barrier()
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_atomic(save_dir / "latest", name + "\n")
        _prune(save_dir, cfg.checkpoint.keep_last_n)
    _barrier()
    return final


def _copy_hf_files(model_dir: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name in HF_FILES:
        src = model_dir / name
        if src.is_file():
            shutil.copy2(src, out / name)


def _prune(save_dir: Path, keep_last_n: int | None) -> None:
    if not keep_last_n:
        return
    for old in list_checkpoints(save_dir)[:-keep_last_n]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(engine: Any, ckpt: Path) -> dict[str, Any]:
    """Restore engine state and this rank's RNG state; returns run_state."""
    run_state = json.loads((ckpt / "run_state.json").read_text())
    world = dist.get_world_size() if dist.is_initialized() else 1
    written_by = run_state.get("engine", "deepspeed")
    engine_name = getattr(engine, "engine_name", "deepspeed")
    if written_by != engine_name:
        raise ValueError(
            f"{ckpt} was written by the {written_by} engine; it cannot be resumed with "
            f"distributed.engine={engine_name} (convert it to a Hugging Face folder and start from that)"
        )
    # DCP (fsdp2) reshards to any number of processes; DeepSpeed's ZeRO partitions need the same number.
    resharded = run_state.get("world_size") != world
    if written_by == "deepspeed" and resharded and run_state.get("zero_stage", 0) > 0:
        raise ValueError(
            f"{ckpt} was written by {run_state.get('world_size')} processes with ZeRO stage "
            f"{run_state.get('zero_stage')}; resuming it needs the same number of processes (got {world})"
        )
    load_path, _ = engine.load_checkpoint(
        str(ckpt.parent), tag=ckpt.name, load_optimizer_states=True, load_lr_scheduler_states=False
    )
    if load_path is None:
        raise FileNotFoundError(f"DeepSpeed could not load the checkpoint in {ckpt}")
    rng_file = ckpt / f"rng_state_rank{_rank()}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return run_state
