"""Fault 1: a run dies at any moment of its checkpoint cycle (kill -9, or an exception at a named point).

Promise: `--resume` continues from the newest complete checkpoint, `latest` never names an incomplete one,
what a crash leaves is removed with a message, and the losses equal those of an uninterrupted run.
Named points come from MOE_RECIPES_FAULT (moe_recipes.faults); random moments from a random step and delay.
"""

from __future__ import annotations

import random
import time

import pytest

from moe_recipes.faults import FAULT_ENV
from moe_recipes.faults import SAVE_POINTS as FAULT_POINTS
from moe_recipes.layout import list_checkpoints
from moe_recipes.train.trainer import train
from tests.harness import kill_tree

from ..train.utils import make_config
from .utils import (
    KILLED,
    check_save_dir,
    config_file,
    leftovers,
    losses,
    run_settings,
    run_training,
    start_training,
)

ITERS = 8


def _reference(tmp_path, model, data, engine, iters=ITERS) -> dict:
    cfg = make_config(
        tmp_path / "reference", model, data, *run_settings(tmp_path / "ref_ckpt", engine, iters)
    )
    assert train(cfg) == 0
    return losses(tmp_path / "reference" / "run")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_mixtral, tiny_dataset) -> dict:
    """Losses of the uninterrupted run (one process, ZeRO-0)."""
    return _reference(tmp_path_factory.mktemp("uninterrupted"), tiny_mixtral, tiny_dataset, "deepspeed")


def test_crash_at_every_named_point_then_resume(
    tmp_path, tiny_mixtral, tiny_dataset, reference, monkeypatch, capsys
):
    """In process (an exception stands in for the crash): one crash per point of the save, each followed
    by a resume, and the whole run's losses equal the uninterrupted run's."""
    save = tmp_path / "ckpt"
    settings = run_settings(save, "deepspeed", ITERS, f"checkpoint.load={save}")
    resumed_from = []
    for step, point in enumerate(FAULT_POINTS, start=2):  # a crash at step 2 ... 7, one point each
        monkeypatch.setenv(FAULT_ENV, f"point={point},iter={step},action=raise")
        with pytest.raises(RuntimeError, match=f"fault injected at {point}"):
            train(make_config(tmp_path, tiny_mixtral, tiny_dataset, *settings))
        latest = check_save_dir(save)
        newest = int(list_checkpoints(save)[-1].name.removeprefix("iter_"))
        assert newest in (step - 1, step) and latest is not None and latest <= newest, (point, latest)
        resumed_from.append((point, latest, leftovers(save)))
        capsys.readouterr()
    monkeypatch.delenv(FAULT_ENV)
    assert train(make_config(tmp_path, tiny_mixtral, tiny_dataset, *settings)) == 0
    assert check_save_dir(save) == ITERS and leftovers(save) == []
    assert losses(tmp_path / "run") == pytest.approx(reference, abs=1e-6)
    # where each crash left `latest`, and what it left behind
    by_point = {p: (latest, left) for p, latest, left in resumed_from}
    assert by_point["engine_saved"] == (1, ["iter_0000002.tmp"])
    assert by_point["before_rename"] == (2, ["iter_0000003.tmp"])
    assert by_point["after_rename"] == (3, [])  # iter_4 is complete; latest still names iter_3
    assert by_point["latest_written"] == (3, ["latest.tmp"])  # resumed from iter_4, the newest
    assert by_point["after_latest"] == (6, [])
    assert by_point["mid_prune"] == (7, ["iter_0000002"])  # half-pruned: no run_state.json


def _kill_trial(config, save, world_size, fault=None, steps_ahead=None, extra=0.0) -> tuple[int, str]:
    """Start a resuming run; kill it at the named point (MOE_RECIPES_FAULT), or kill -9 the whole job
    `extra` seconds after it logs the step `steps_ahead` past its newest checkpoint (the step's save, or
    the next step's forward, is then under way: a random moment of the cycle, whatever the machine's speed).
    """
    if fault is not None:
        return run_training(config, world_size, "--resume", fault=fault)
    target = (check_save_dir(save) or 0) + steps_ahead
    proc = start_training(config, world_size, "--resume")
    lines, deadline = [], time.monotonic() + 600
    for line in proc.stdout:  # type: ignore[union-attr]
        lines.append(line)
        if line.startswith(f"step {target}/") or time.monotonic() > deadline:
            time.sleep(extra)
            kill_tree(proc)  # torchrun and its workers, which run in sessions of their own
            break
    out, _ = proc.communicate()
    return proc.returncode, "".join(lines) + out


def _chain(tmp_path, model, data, engine, world_size, trials: list[dict], iters=ITERS) -> list[dict]:
    """Run the trials one after another on one save folder, each resuming the last; check the folder
    after each and return what every trial saw."""
    save = tmp_path / "ckpt"
    config = config_file(tmp_path, model, data, *run_settings(save, engine, iters))
    seen = []
    for trial in trials:
        before_latest, before_left = check_save_dir(save), leftovers(save)
        t0 = time.monotonic()
        code, out = _kill_trial(config, save, world_size, **trial)
        latest = check_save_dir(save)  # raises if latest names an incomplete or damaged checkpoint
        if "fault" in trial:  # a timed kill may come before the resume and the clean-up
            if before_latest is not None:
                assert f"resumed from {save}" in out, out[-3000:]
            for name in before_left:
                assert f"removed {save / name}" in out, (name, out[-3000:])
        seen.append({**trial, "code": code, "latest": latest, "seconds": time.monotonic() - t0})
    code, out = run_training(config, world_size, "--resume")
    assert code == 0, out[-3000:]
    assert check_save_dir(save) == iters and leftovers(save) == []
    return seen


def test_kill9_inside_the_save_and_resume(tmp_path, tiny_mixtral, tiny_dataset, reference):
    """Real kill -9, one process, inside the checkpoint write; the restart removes the temporary folder
    with a message and ends with the uninterrupted run's losses."""
    seen = _chain(
        tmp_path, tiny_mixtral, tiny_dataset, "deepspeed", 1, [{"fault": "point=engine_saved,iter=3"}]
    )
    assert [(s["code"], s["latest"]) for s in seen] == [(KILLED, 2)]
    assert losses(tmp_path / "run") == pytest.approx(reference, abs=1e-6)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("engine", ["deepspeed", "fsdp2"])
def test_kill9_at_named_points_and_random_moments_two_processes(tmp_path, tiny_mixtral, tiny_dataset, engine):
    """2 processes under torchrun: a kill -9 (of rank 0 at a named point, or of the whole job after a
    random delay) per trial; 15 trials per engine, then the run finishes with the uninterrupted losses."""
    iters = 100
    # The reference: the same 2-process job, uninterrupted (1 process sums the aux loss in another order)
    ref = config_file(
        tmp_path / "reference",
        tiny_mixtral,
        tiny_dataset,
        *run_settings(tmp_path / "ref_ckpt", engine, iters, "checkpoint.save_interval=0"),
    )
    code, out = run_training(ref, 2)
    assert code == 0, out[-3000:]
    reference = losses(tmp_path / "reference" / "run")
    rng = random.Random(1234 if engine == "deepspeed" else 4321)
    named = [{"fault": f"point={p},iter={i},rank=0"} for i, p in enumerate(FAULT_POINTS, start=2)]
    # A kill 1-8 steps past the newest checkpoint, 0-1.5 s after that step is logged (a step with its save
    # takes about that long here): 9 of them use at most 72 of the 100 steps.
    timed = [{"steps_ahead": rng.randint(1, 8), "extra": rng.uniform(0, 1.5)} for _ in range(9)]
    seen = _chain(tmp_path, tiny_mixtral, tiny_dataset, engine, 2, named + timed, iters)
    report = "\n".join(str(s) for s in seen)
    print(f"\n{engine}: {len(seen)} trials\n{report}")
    assert all(s["code"] != 0 for s in seen), report  # every trial was really killed before the end
    assert losses(tmp_path / "run") == pytest.approx(reference, rel=1e-5, abs=1e-5)


def test_resaving_the_step_latest_names_never_leaves_it_missing(
    tmp_path, tiny_mixtral, tiny_dataset, monkeypatch
):
    """Resumed explicitly from an older checkpoint into the same folder, the run saves again a step that
    `latest` names. The new folder is swapped in atomically: a crash right after the swap (before the old
    copy is deleted) leaves `latest` naming the new, complete checkpoint, and the next start removes the
    old copy with a message."""
    from moe_recipes.train import checkpoint as ckpt_mod

    save = tmp_path / "ckpt"
    settings = run_settings(save, "deepspeed", 3)
    assert train(make_config(tmp_path, tiny_mixtral, tiny_dataset, *settings)) == 0
    assert check_save_dir(save) == 3
    old_state = (save / "iter_0000003" / "run_state.json").stat().st_mtime_ns
    real_rmtree = ckpt_mod.shutil.rmtree

    def crash_on_old_copy(path, *args, **kwargs):
        if str(path).endswith("iter_0000003.tmp"):
            raise RuntimeError("crash after the swap")
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(ckpt_mod.shutil, "rmtree", crash_on_old_copy)
    again = [*settings, f"checkpoint.load={save / 'iter_0000002'}"]
    with pytest.raises(RuntimeError, match="crash after the swap"):
        train(make_config(tmp_path, tiny_mixtral, tiny_dataset, *again))
    monkeypatch.undo()
    assert check_save_dir(save) == 3  # latest names a complete iter_3: the new one
    assert (save / "iter_0000003" / "run_state.json").stat().st_mtime_ns > old_state
    assert leftovers(save) == ["iter_0000003.tmp"]  # the old copy, swapped out
    code, out = run_training(config_file(tmp_path, tiny_mixtral, tiny_dataset, *settings), 1, "--resume")
    assert code == 0 and f"removed {save / 'iter_0000003.tmp'}" in out, out[-2000:]
    assert leftovers(save) == []
