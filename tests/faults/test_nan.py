"""Fault 7: a NaN or Inf loss at step k. nan_policy=skip keeps step k-1's weights bit for bit and trains on;
nan_policy=stop exits with code 3 and leaves the last checkpoint whole."""

from __future__ import annotations

import math

import pytest
import torch

from moe_recipes.convert.sources import checkpoint_source, inspect_checkpoint
from moe_recipes.train import objective as objective_mod
from moe_recipes.train.trainer import EXIT_NONFINITE, train

from ..train.utils import make_config, step_records
from .utils import check_save_dir, leftovers, run_settings

BAD_STEP = 3


def _poison_step(monkeypatch, step: int, value: float, micro_per_step: int = 2) -> None:
    """The loss of the last micro-batch of `step` becomes `value` (training forwards only: eval is off)."""
    original = objective_mod.CausalLMObjective.forward
    calls = {"n": 0}

    def forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if kwargs.get("route_only"):
            return out
        calls["n"] += 1
        if calls["n"] == step * micro_per_step:
            out["lm_loss_sum"] = out["lm_loss_sum"] * 0 + value
        return out

    monkeypatch.setattr(objective_mod.CausalLMObjective, "forward", forward)


def _weights(save, step: int) -> dict[str, torch.Tensor]:
    source = checkpoint_source(inspect_checkpoint(save / f"iter_{step:07d}"))
    return {k: source.get(k).clone() for k in source.keys()}


@pytest.mark.parametrize(("engine", "value"), [("deepspeed", math.nan), ("fsdp2", math.inf)])
def test_skip_keeps_the_previous_weights_bit_identical(
    tmp_path, tiny_mixtral, tiny_dataset, monkeypatch, engine, value
):
    _poison_step(monkeypatch, BAD_STEP, value)
    save = tmp_path / "ckpt"
    cfg = make_config(
        tmp_path,
        tiny_mixtral,
        tiny_dataset,
        *run_settings(save, engine, 5, "checkpoint.keep_last_n=5"),
        "train.nan_policy=skip",
    )
    assert train(cfg) == 0
    records = step_records(tmp_path / "run")
    assert sorted(records) == [1, 2, 3, 4, 5]
    assert [s for s, r in records.items() if r["skipped"]] == [BAD_STEP]
    before, at, after = (_weights(save, s) for s in (BAD_STEP - 1, BAD_STEP, BAD_STEP + 1))
    assert before.keys() == at.keys() and len(before) > 10
    assert all(torch.equal(before[k], at[k]) for k in before)  # the bad step changed nothing
    assert not all(torch.equal(at[k], after[k]) for k in at)  # and the next one trained
    assert all(math.isfinite(records[s]["lm_loss"]) for s in (4, 5))


def test_stop_exits_3_and_keeps_the_last_checkpoint(
    tmp_path, tiny_mixtral, tiny_dataset, monkeypatch, capsys
):
    _poison_step(monkeypatch, BAD_STEP, math.nan)
    save = tmp_path / "ckpt"
    cfg = make_config(
        tmp_path, tiny_mixtral, tiny_dataset, *run_settings(save, "deepspeed", 5), "train.nan_policy=stop"
    )
    assert train(cfg) == EXIT_NONFINITE
    assert f"at step {BAD_STEP}: stopping without saving" in capsys.readouterr().out
    assert check_save_dir(save) == BAD_STEP - 1 and leftovers(save) == []
    assert sorted(p.name for p in save.glob("iter_*")) == ["iter_0000001", "iter_0000002"]
    assert all(torch.isfinite(w).all() for w in _weights(save, BAD_STEP - 1).values())
