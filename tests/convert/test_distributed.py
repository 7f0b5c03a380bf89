"""A 2-process ZeRO-3 run (torchrun): its export, the direct conversion and DeepSpeed's zero_to_fp32.py followed
by `convert --base-model` give the same model, whose perplexity is the trainer's validation loss."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_recipes.cli import main
from moe_recipes.convert.hf import convert_checkpoint
from moe_recipes.infer.perplexity import evaluate_perplexity

from .utils import (
    assert_released_layout,
    expected_keys,
    last_valid_loss,
    logits_of,
    probe_ids,
    weight_map,
)

pytestmark = pytest.mark.distributed


LAST = "iter_0000004"  # the run's last step, saved with its HF export


@pytest.fixture(scope="module")
def run_dir(zero3_two_processes) -> Path:
    """The session's 4-step ZeRO-3 run on 2 processes (tests/conftest.py), which saved its last step with
    the exported HF folder (the ZeRO-3 reference of tests/train, launched once)."""
    d, out = zero3_two_processes.dir, zero3_two_processes.stdout
    assert "2 process(es) (torchrun), ZeRO-3" in out
    assert "(built on meta, partitioned by ZeRO-3, each rank read only its partition)" in out
    assert (d / "ckpt" / LAST / "zero_pp_rank_1_mp_rank_00_optim_states.pt").is_file()
    return d


def assert_same_model(folder: Path, exported: Path, base: str) -> None:
    ids = probe_ids()
    assert set(weight_map(folder)) == expected_keys(base)
    assert_released_layout(folder, base)
    assert torch.equal(logits_of(folder, ids), logits_of(exported, ids)), folder


def test_direct_conversion_equals_the_export(run_dir, tiny_mixtral):
    direct = convert_checkpoint(run_dir / "ckpt", run_dir / "direct")
    assert_same_model(direct, run_dir / "ckpt" / LAST / "hf", tiny_mixtral)


def test_zero_to_fp32_then_convert(run_dir, tiny_mixtral):
    save, consolidated = run_dir / "ckpt", run_dir / "fp32"
    # DeepSpeed's own script, copied into the save folder, consolidates to sharded safetensors (via `latest`)
    script = [sys.executable, str(save / "zero_to_fp32.py"), str(save), str(consolidated)]
    subprocess.run(
        [*script, "--safe_serialization", "--max_shard_size", "5MB"], check=True, capture_output=True
    )
    assert (consolidated / "model.safetensors.index.json").is_file()
    # ... whose `model.`-prefixed keys the convert command turns into an HF folder
    out = run_dir / "two_step"
    assert main(["convert", str(consolidated), "--base-model", tiny_mixtral, "--output", str(out)]) == 0
    assert_same_model(out, save / LAST / "hf", tiny_mixtral)


def test_eval_reproduces_the_trainer_validation_loss(run_dir, tiny_dataset):
    # eval.iters (2) x global batch (4) samples: what the trainer evaluated, whatever the number of ranks
    result = evaluate_perplexity(
        run_dir / "ckpt" / LAST / "hf",
        tiny_dataset,
        seq_length=64,
        split="90,10,0",
        seed=1234,
        max_samples=2 * 4,
        cache_dir=str(run_dir / "cache"),
        progress=False,
    )
    assert result.loss == pytest.approx(last_valid_loss(run_dir / "run"), rel=1e-5)
