"""Single-process training: logs, checkpoints, exact resume, accumulation parity, NaN handling, signals."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from moe_recipes.train import objective as objective_mod
from moe_recipes.train.trainer import EXIT_NONFINITE, train

from .utils import make_config, metrics, step_records, write_config

ENGINES = ["deepspeed", "fsdp2"]

REQUIRED_KEYS = {
    "step",
    "loss",
    "lm_loss",
    "aux_loss",
    "z_loss",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "expert_share",
    "expert_imbalance",
    "tflops_per_device",
    "peak_mem_gb",
}


def test_run_logs_metrics_and_keeps_last_checkpoints(tmp_path, tiny_mixtral, tiny_dataset):
    cfg = make_config(
        tmp_path,
        tiny_mixtral,
        tiny_dataset,
        f"checkpoint.save={tmp_path / 'ckpt'}",
        "checkpoint.save_interval=2",
        "checkpoint.keep_last_n=2",
        "log.tensorboard=true",
    )
    assert train(cfg) == 0
    records = metrics(tmp_path / "run")
    steps = [r for r in records if "lm_loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    for r in steps:
        assert REQUIRED_KEYS <= set(r), REQUIRED_KEYS - set(r)
        assert math.isfinite(r["loss"]) and r["tokens_per_s"] > 0
        assert r["loss"] == pytest.approx(r["lm_loss"] + 0.01 * r["aux_loss"] + 0.001 * r["z_loss"], rel=1e-6)
        assert len(r["expert_share"]) == 2 and all(len(row) == 4 for row in r["expert_share"])
        assert all(sum(row) == pytest.approx(1.0, abs=1e-3) for row in r["expert_share"])
        assert all(imb >= 1.0 for imb in r["expert_imbalance"])
    # warmup 2 steps to 1e-3, then cosine to 1e-4 at step 6
    assert steps[0]["lr"] == pytest.approx(5e-4) and steps[1]["lr"] == pytest.approx(1e-3)
    assert [r["step"] for r in records if "valid_loss" in r] == [3, 6]
    ckpt = tmp_path / "ckpt"
    assert (ckpt / "latest").read_text().strip() == "iter_0000006"
    assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith("iter_")) == [
        "iter_0000004",
        "iter_0000006",
    ]
    state = json.loads((ckpt / "iter_0000006" / "run_state.json").read_text())
    assert state["iteration"] == 6 and state["consumed_samples"] == 24
    assert (ckpt / "iter_0000006" / "config.yaml").is_file()
    assert (ckpt / "iter_0000006" / "hf_config" / "config.json").is_file()
    assert (ckpt / "iter_0000006" / "rng_state_rank0.pt").is_file()
    assert list((tmp_path / "run" / "tensorboard").iterdir())


@pytest.mark.parametrize("engine", ENGINES)
def test_gradient_accumulation_matches_larger_micro_batch(tmp_path, tiny_mixtral, tiny_dataset, engine):
    """4 x micro batch 1 == 1 x micro batch 4 (aux loss off: it is a per-micro-batch statistic)."""
    runs = {}
    for mbs in (4, 1):
        d = tmp_path / f"mbs{mbs}"
        cfg = make_config(
            d,
            tiny_mixtral,
            tiny_dataset,
            f"train.micro_batch_size={mbs}",
            "train.iters=4",
            "moe.aux_loss_coef=0",
            "moe.z_loss_coef=0",
            "eval.iters=0",
            f"distributed.engine={engine}",
        )
        assert train(cfg) == 0
        runs[mbs] = [r["lm_loss"] for r in step_records(d / "run").values()]
    assert runs[4] == pytest.approx(runs[1], rel=1e-5)
    assert runs[4][0] != pytest.approx(runs[4][-1], rel=1e-3)  # it did train


@pytest.mark.parametrize("engine", ENGINES)
def test_resumed_run_matches_uninterrupted(tmp_path, tiny_mixtral, tiny_dataset, engine):
    eng = f"distributed.engine={engine}"
    full = make_config(tmp_path / "full", tiny_mixtral, tiny_dataset, eng)
    assert train(full) == 0
    ckpt = tmp_path / "split" / "ckpt"
    first = make_config(
        tmp_path / "split",
        tiny_mixtral,
        tiny_dataset,
        eng,
        f"checkpoint.save={ckpt}",
        "train.exit_interval=3",
    )
    assert train(first) == 0
    assert (ckpt / "latest").read_text().strip() == "iter_0000003"
    second = make_config(
        tmp_path / "split",
        tiny_mixtral,
        tiny_dataset,
        eng,
        f"checkpoint.save={ckpt}",
        f"checkpoint.load={ckpt}",
    )
    assert train(second) == 0
    a, b = step_records(tmp_path / "full" / "run"), step_records(tmp_path / "split" / "run")
    assert sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        assert b[step]["lm_loss"] == pytest.approx(a[step]["lm_loss"], abs=1e-6), step
        assert b[step]["aux_loss"] == pytest.approx(a[step]["aux_loss"], abs=1e-6), step
    valid_a = [r["valid_loss"] for r in metrics(tmp_path / "full" / "run") if "valid_loss" in r]
    valid_b = [r["valid_loss"] for r in metrics(tmp_path / "split" / "run") if "valid_loss" in r]
    assert valid_b == pytest.approx(valid_a, abs=1e-6)


def _nan_at(monkeypatch, call: int) -> None:
    """Make the `call`-th forward pass (1-based, training and eval alike) return a NaN loss."""
    original = objective_mod.CausalLMObjective.forward
    calls = {"n": 0}

    def forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == call:
            out["lm_loss_sum"] = out["lm_loss_sum"] * float("nan")
        return out

    monkeypatch.setattr(objective_mod.CausalLMObjective, "forward", forward)


def test_nan_loss_stops_without_saving(tmp_path, tiny_mixtral, tiny_dataset, monkeypatch, capsys):
    _nan_at(monkeypatch, call=5)  # step 3's first micro-batch (2 per step)
    cfg = make_config(
        tmp_path, tiny_mixtral, tiny_dataset, f"checkpoint.save={tmp_path / 'ckpt'}", "eval.interval=0"
    )
    assert train(cfg) == EXIT_NONFINITE
    out = capsys.readouterr().out
    assert "non-finite loss" in out and "at step 3" in out
    assert not (tmp_path / "ckpt" / "latest").exists()


def test_nan_loss_skip_discards_the_update(tmp_path, tiny_mixtral, tiny_dataset, monkeypatch):
    _nan_at(monkeypatch, call=5)
    ckpt = tmp_path / "ckpt"
    cfg = make_config(
        tmp_path,
        tiny_mixtral,
        tiny_dataset,
        f"checkpoint.save={ckpt}",
        "train.nan_policy=skip",
        "checkpoint.save_interval=1",
        "eval.interval=0",
        "eval.iters=0",
    )
    assert train(cfg) == 0
    recs = step_records(tmp_path / "run")
    assert [s for s, r in recs.items() if r["skipped"]] == [3]
    assert all(math.isfinite(r["lm_loss"]) for s, r in recs.items() if s != 3)

    def weights(step: int) -> dict:
        state = torch.load(ckpt / f"iter_{step:07d}" / "mp_rank_00_model_states.pt", weights_only=False)
        return state["module"]

    w2, w3, w4 = weights(2), weights(3), weights(4)
    assert all(torch.equal(w2[k], w3[k]) for k in w2)  # step 3 changed nothing
    assert not all(torch.equal(w3[k], w4[k]) for k in w3)  # step 4 trained again


def test_activation_checkpointing_gives_the_same_losses(tmp_path, tiny_mixtral, tiny_dataset):
    losses = []
    for flag in ("false", "true"):
        d = tmp_path / flag
        cfg = make_config(
            d,
            tiny_mixtral,
            tiny_dataset,
            f"train.activation_checkpointing={flag}",
            "train.iters=3",
            "eval.iters=0",
        )
        assert train(cfg) == 0
        losses.append([v for r in step_records(d / "run").values() for v in (r["lm_loss"], r["aux_loss"])])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_document_masking_changes_attention(tmp_path, tiny_mixtral, tiny_dataset):
    out = {}
    for name, extra in {
        "plain": [],
        "pos": ["data.reset_position_ids=true"],
        "mask": ["data.reset_position_ids=true", "data.reset_attention_mask=true"],
    }.items():
        d = tmp_path / name
        cfg = make_config(d, tiny_mixtral, tiny_dataset, "train.iters=1", "eval.iters=0", *extra)
        assert train(cfg) == 0
        out[name] = step_records(d / "run")[1]["lm_loss"]
    assert all(math.isfinite(v) for v in out.values())
    assert out["plain"] != out["pos"] and out["pos"] != out["mask"]


@pytest.mark.parametrize("engine", ENGINES)
def test_sigterm_finishes_the_step_saves_and_resumes(tmp_path, tiny_mixtral, tiny_dataset, engine):
    ckpt = tmp_path / "ckpt"
    config = write_config(
        tmp_path,
        tiny_mixtral,
        tiny_dataset,
        f"distributed.engine={engine}",
        f"checkpoint.save={ckpt}",
        "train.iters=400",
        "eval.interval=0",
        "log.interval=1",
    )
    cmd = [sys.executable, "-m", "moe_recipes.cli", "train", str(config)]
    # Not the job variables an in-process run of an earlier test exported (its MASTER_PORT is still in use).
    job_vars = ("MASTER_PORT", "MASTER_ADDR", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    env = {**{k: v for k, v in os.environ.items() if k not in job_vars}, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    deadline = time.time() + 240
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step 2/") or time.time() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=240)
    output = "".join(lines) + rest
    assert proc.returncode == 0, output
    assert "stopped by signal" in output
    state = json.loads((ckpt / (ckpt / "latest").read_text().strip() / "run_state.json").read_text())
    assert 2 <= state["iteration"] < 400
    assert state["consumed_samples"] == 4 * state["iteration"]
    resumed = subprocess.run(
        cmd + ["--resume", "train.exit_interval=1"], capture_output=True, text=True, env=env, timeout=240
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    step = state["iteration"]
    assert f"resumed from {ckpt / f'iter_{step:07d}'}" in resumed.stdout
    assert (ckpt / "latest").read_text().strip() == f"iter_{step + 1:07d}"


SYNC_METHODS = ("item", "cpu", "tolist", "__bool__", "__float__", "__int__")


@pytest.mark.parametrize("engine", ENGINES)
def test_one_host_sync_per_step(tmp_path, tiny_mixtral, tiny_dataset, monkeypatch, engine):
    """The step reads the device once (loss parts, counts and flags in one copy), whatever the accumulation."""
    from moe_recipes.train import trainer as trainer_mod

    cfg = make_config(
        tmp_path, tiny_mixtral, tiny_dataset, "train.global_batch_size=8", "train.iters=2",
        f"distributed.engine={engine}",
    )  # fmt: skip
    run = trainer_mod.setup(cfg)
    batches = trainer_mod._train_batches(run)
    micro = [next(batches) for _ in range(run.grad_accum)]
    assert run.grad_accum == 4
    calls: list[str] = []
    src = os.path.join("moe_recipes", "")
    for name in SYNC_METHODS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if src in caller:  # our code, not torch's or transformers' internals
                calls.append(f"{_name} from {os.path.basename(caller)}:{sys._getframe(1).f_lineno}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    result = trainer_mod.train_step(run, micro, trainer_mod.StopRequest())
    monkeypatch.undo()
    assert len(calls) == 1, calls
    assert math.isfinite(result["lm_loss"]) and result["real_tokens"] == 8 * 64
    run.writer.close()
