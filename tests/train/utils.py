"""Helpers shared by the training tests: a small config, reading metrics back."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from moe_recipes.config import Config, load_config

# Micro batch 2 everywhere: one process accumulates 2 micro-batches, two processes take one each, so every
# micro-batch (and thus the per-micro-batch load-balancing loss) is the same in both runs.
TWO_PROCESS_COMMON = (
    "train.micro_batch_size=2",
    "train.global_batch_size=4",
    "train.iters=4",
    "eval.interval=2",
)


def overrides(tmp_path: Path, model: str, data: str, *extra: str) -> list[str]:
    return [
        f"model.path={model}",
        f"data.path={data}",
        "data.seq_length=64",
        "data.split=90,10,0",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.num_workers=0",
        "train.micro_batch_size=2",
        "train.global_batch_size=4",
        "train.iters=6",
        "train.precision=fp32",
        "optim.lr=1e-3",
        "optim.min_lr=1e-4",
        "optim.warmup_iters=2",
        "moe.aux_loss_coef=0.01",
        "moe.z_loss_coef=0.001",
        "eval.interval=3",
        "eval.iters=2",
        f"log.dir={tmp_path / 'run'}",
        "log.tensorboard=false",
        "log.progress_bar=false",
        "distributed.zero_stage=0",
        *extra,
    ]


def make_config(tmp_path: Path, model: str, data: str, *extra: str) -> Config:
    return load_config(None, overrides(tmp_path, model, data, *extra))


def write_config(tmp_path: Path, model: str, data: str, *extra: str) -> Path:
    cfg = make_config(tmp_path, model, data, *extra)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def step_records(run_dir: Path) -> dict[int, dict]:
    """The last training record of each step (a resumed run appends to the same file)."""
    return {r["step"]: r for r in metrics(run_dir) if "lm_loss" in r}
