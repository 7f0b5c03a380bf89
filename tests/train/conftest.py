"""Fixtures of the training tests."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from moe_recipes.train import trainer
from tests.harness import run_cli_distributed

from .utils import TWO_PROCESS_COMMON, write_config


@pytest.fixture
def nothing_expensive(monkeypatch):
    """Make the rendezvous and the model load fail loudly: a preflight error must come before them."""

    def forbidden(*args, **kwargs):
        raise AssertionError("reached an expensive step before the cheap checks failed")

    monkeypatch.setattr(trainer, "init_distributed", forbidden)
    monkeypatch.setattr(trainer, "load_model", forbidden)


@pytest.fixture(scope="session")
def zero3_two_processes(tmp_path_factory, tiny_mixtral, tiny_dataset) -> SimpleNamespace:
    """One 2-process ZeRO-3 run under torchrun (TWO_PROCESS_COMMON, a checkpoint at its last step), the
    reference of the single-process and the FSDP2 comparisons: `.dir` (its work folder, `run/` and
    `ckpt/` inside) and `.stdout`."""
    work: Path = tmp_path_factory.mktemp("zero3_two_processes")
    config = write_config(
        work,
        tiny_mixtral,
        tiny_dataset,
        *TWO_PROCESS_COMMON,
        "distributed.zero_stage=3",
        f"checkpoint.save={work / 'ckpt'}",
    )
    out = run_cli_distributed(["train", str(config)], world_size=2, launcher="torchrun", timeout=600)
    return SimpleNamespace(dir=work, stdout=out.stdout)
