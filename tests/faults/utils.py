"""Helpers of the fault-injection suite: start real training processes, inject faults, check a save folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from moe_recipes.faults import FAULT_ENV
from moe_recipes.layout import ITER_RE, list_checkpoints, verify_checkpoint
from tests.harness import JOB_VARS, free_port, launch_command

from ..train.utils import step_records, write_config

KILLED = -9  # Popen's returncode of a process killed by SIGKILL


def run_settings(save: Path, engine: str, iters: int, *extra: str) -> list[str]:
    """Frequent checkpoints, every step logged, no eval (the trials compare training losses)."""
    return [
        f"distributed.engine={engine}",
        f"checkpoint.save={save}",
        "checkpoint.save_interval=1",
        "checkpoint.keep_last_n=2",
        f"train.iters={iters}",
        "log.interval=1",
        "eval.interval=0",
        "eval.iters=0",
        *extra,
    ]


def child_env(fault: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in JOB_VARS and k != FAULT_ENV}
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    if fault:
        env[FAULT_ENV] = fault
    return env


def train_command(config: Path, world_size: int, *args: str) -> list[str]:
    argv = ["train", str(config), *args]
    if world_size == 1:
        return [sys.executable, "-m", "moe_recipes.cli", *argv]
    return launch_command("torchrun", "moe_recipes.cli", argv, world_size, free_port())


def start_training(config: Path, world_size: int, *args: str, fault: str | None = None) -> subprocess.Popen:
    """The CLI in its own session (so the test can kill the launcher and every rank at once)."""
    return subprocess.Popen(
        train_command(config, world_size, *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=child_env(fault),
        start_new_session=True,
    )


def run_training(config: Path, world_size: int, *args: str, fault: str | None = None, timeout: float = 600):
    proc = start_training(config, world_size, *args, fault=fault)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def check_save_dir(save: Path) -> int | None:
    """The invariants a crash must keep: `latest` names a complete checkpoint whose files all have their
    recorded sizes, and so does every other folder that looks complete. Returns latest's step or None."""
    for ckpt in list_checkpoints(save):
        verify_checkpoint(ckpt)
        json.loads((ckpt / "run_state.json").read_text())
    latest = save / "latest"
    if not latest.exists():
        return None
    name = latest.read_text().strip()
    assert ITER_RE.match(name), f"latest holds {name!r}"
    assert (save / name / "run_state.json").is_file(), f"latest names {name}, which is incomplete"
    verify_checkpoint(save / name)
    return int(name.removeprefix("iter_"))


def leftovers(save: Path) -> list[str]:
    """What an interrupted save leaves: temporary folders/files, folders that are not complete checkpoints."""
    if not save.is_dir():
        return []
    return sorted(
        p.name
        for p in save.iterdir()
        if p.name.endswith(".tmp") or (ITER_RE.match(p.name) and not (p / "run_state.json").is_file())
    )


def losses(run_dir: Path) -> dict[int, float]:
    """{step: lm_loss}, and {-step: aux_loss}, of each step's last record (a resumed run repeats steps)."""
    records = step_records(run_dir)
    return {
        **{s: r["lm_loss"] for s, r in records.items()},
        **{-s: r["aux_loss"] for s, r in records.items()},
    }


def config_file(tmp_path: Path, model: str, data: str, *extra: str) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    return write_config(tmp_path, model, data, *extra)
