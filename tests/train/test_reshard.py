"""DeepSpeed checkpoints resume on another number of processes, ZeRO stage or expert-parallel size
(`train.reshard`) and continue the uninterrupted run's losses; an interrupted conversion is never taken
for a complete one.

The uninterrupted run saves at step 3 on its way to step 6; the resumed run starts from a copy of its save
folder holding only step 3, on another process count. With a fixed global batch both see the same data
(the samples are cut by consumed samples), so steps 4-6 must give the same losses."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from moe_recipes.layout import resharded_dir
from moe_recipes.train import reshard
from moe_recipes.train.checkpoint import clean_leftovers, derived_seed
from moe_recipes.train.preflight import check_resume_compatible
from tests.harness import DIRECT, _child_environ, run_cli_distributed

from .utils import make_config, step_records, write_config

SETTINGS = (
    "train.iters=6",
    "train.global_batch_size=8",
    "eval.iters=0",
    "optim.warmup_iters=2",
    "checkpoint.save_interval=3",
    "distributed.engine=deepspeed",
)
KEYS = ("lm_loss", "aux_loss", "z_loss", "grad_norm")
_worst: dict[str, float] = {}  # largest relative difference per metric over the resumes (reported)


def _launch(work: Path, model: str, data: str, world: int, stage: int, ep: int, *extra: str) -> str:
    work.mkdir(parents=True, exist_ok=True)
    config = write_config(
        work,
        model,
        data,
        *SETTINGS,
        f"distributed.zero_stage={stage}",
        f"distributed.expert_parallel_size={ep}",
        *extra,
    )
    return run_cli_distributed(["train", str(config)], world_size=world, launcher=DIRECT, timeout=600).stdout


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_mixtral, tiny_dataset):
    """`run(world, stage, ep)`: the 6-step run of that layout (trained once per module), which saved
    checkpoints at steps 3 and 6; returns its work folder."""
    done: dict[tuple[int, int, int], Path] = {}

    def run(world: int, stage: int, ep: int) -> Path:
        key = (world, stage, ep)
        if key not in done:
            work = tmp_path_factory.mktemp(f"w{world}_z{stage}_ep{ep}")
            _launch(work, tiny_mixtral, tiny_dataset, world, stage, ep, f"checkpoint.save={work / 'ckpt'}")
            done[key] = work
        return done[key]

    return run


def _save_folder_at_step3(source: Path, dest: Path) -> Path:
    """A copy of `source`'s save folder as it was after step 3."""
    shutil.copytree(source / "iter_0000003", dest / "iter_0000003")
    (dest / "latest").write_text("iter_0000003\n")
    return dest


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def _resume_and_compare(uninterrupted, tmp_path, model, data, written, resumed) -> str:
    whole = step_records(uninterrupted(*written) / "run")
    ckpt = _save_folder_at_step3(uninterrupted(*written) / "ckpt", tmp_path / "ckpt")
    out = _launch(tmp_path, model, data, *resumed, f"checkpoint.save={ckpt}", f"checkpoint.load={ckpt}")
    after = step_records(tmp_path / "run")
    assert sorted(after) == [4, 5, 6]
    worst = max(_rel(after[s][k], whole[s][k]) for s in after for k in KEYS)
    for step in after:
        for key in KEYS:
            _worst[key] = max(_worst.get(key, 0.0), _rel(after[step][key], whole[step][key]))
            assert after[step][key] == pytest.approx(whole[step][key], rel=1e-4), (step, key)
    print(f"\n[reshard] {written} -> {resumed}: worst relative difference {worst:.3g}; so far {_worst}")
    # the converted copy was removed once the run's next checkpoint (step 6) was complete
    assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith("iter_")) == [
        "iter_0000003",
        "iter_0000006",
    ]
    return out


@pytest.mark.distributed
def test_zero2_ep2_on_two_processes_resumes_on_one_without_ep(
    uninterrupted, tmp_path, tiny_mixtral, tiny_dataset
):
    out = _resume_and_compare(uninterrupted, tmp_path, tiny_mixtral, tiny_dataset, (2, 2, 2), (1, 2, 1))
    assert (
        "checkpoint written by 2 processes, ZeRO-2, EP 2; resumed on 1 process, ZeRO-2: converted to "
        f"{tmp_path / 'ckpt' / 'iter_0000003.resharded'} in"
    ) in out


# (processes, ZeRO stage, EP) written -> resumed
MATRIX = [
    ((2, 2, 1), (1, 2, 1)),
    ((1, 2, 1), (2, 2, 1)),
    ((2, 3, 1), (1, 3, 1)),
    ((1, 3, 1), (2, 3, 1)),
    ((1, 2, 1), (2, 2, 2)),
    ((2, 1, 2), (1, 1, 1)),
    ((2, 2, 2), (2, 3, 1)),  # another stage on as many processes
    ((1, 3, 1), (2, 1, 2)),
    ((2, 2, 2), (1, 0, 1)),  # to ZeRO-0
]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize(("written", "resumed"), MATRIX, ids=[f"{a}->{b}" for a, b in MATRIX])
def test_deepspeed_checkpoint_resumes_on_another_layout(
    uninterrupted, tmp_path, tiny_mixtral, tiny_dataset, written, resumed
):
    _resume_and_compare(uninterrupted, tmp_path, tiny_mixtral, tiny_dataset, written, resumed)


@pytest.mark.distributed
def test_interrupted_conversion_is_never_taken_for_complete(uninterrupted, tmp_path):
    """kill -9 in the middle of the conversion and just before its rename: only a `.tmp` folder remains,
    which the next conversion (or the save folder's clean-up) removes; the reconversion is complete and a
    later one reuses it."""
    ckpt = _save_folder_at_step3(uninterrupted(2, 2, 2) / "ckpt", tmp_path / "ckpt") / "iter_0000003"
    state = json.loads((ckpt / "run_state.json").read_text())
    out, tmp = resharded_dir(ckpt), resharded_dir(ckpt).with_name(ckpt.name + ".resharded.tmp")
    code = (
        "import json, sys; from pathlib import Path; from moe_recipes.train.reshard import convert; "
        "p = Path(sys.argv[1]); convert(p, json.loads((p / 'run_state.json').read_text()))"
    )
    for point in ("reshard_partial", "reshard_before_rename"):
        env = {**_child_environ(), "MOE_RECIPES_FAULT": f"point={point}"}
        proc = subprocess.run(
            [sys.executable, "-c", code, str(ckpt)], env=env, capture_output=True, text=True
        )
        assert proc.returncode == -9, proc.stderr[-2000:]
        assert tmp.is_dir() and not out.exists(), point
    assert clean_leftovers(tmp_path / "ckpt") == ["iter_0000003.resharded.tmp"]
    tmp.mkdir()  # a leftover .tmp is also removed by the conversion itself
    folder, _, reused = reshard.convert(ckpt, state)
    assert (folder, reused) == (out, False) and reshard.is_complete(out) and not tmp.exists()
    assert reshard.convert(ckpt, state)[2]  # reused
    next(out.glob("params/*.pt")).write_bytes(b"cut short")
    assert not reshard.is_complete(out)
    assert reshard.convert(ckpt, state)[2] is False  # a damaged copy is converted again


def test_which_resumes_need_resharding():
    state = {"world_size": 2, "zero_stage": 2, "expert_parallel_size": 2}
    assert not reshard.needs_reshard(state, 2, 2, 2)
    assert reshard.needs_reshard(state, 1, 2, 2) and reshard.needs_reshard(state, 2, 2, 1)
    assert reshard.needs_reshard(state, 2, 3, 2)
    zero0 = {"world_size": 2, "zero_stage": 0, "expert_parallel_size": 1}
    assert not reshard.needs_reshard(zero0, 1, 0, 1)  # whole states: DeepSpeed loads them anywhere
    assert reshard.needs_reshard(zero0, 1, 2, 1)
    assert reshard.describe(1, 2, 1) == "1 process, ZeRO-2"
    assert reshard.describe(2, 3, 2) == "2 processes, ZeRO-3, EP 2"
    # ranks the checkpoint's run did not have get distinct, reproducible seeds
    assert derived_seed(1234, 3, 1) == derived_seed(1234, 3, 1) != derived_seed(1234, 3, 2)


def test_preflight_allows_another_ep_size_but_not_from_zero0(tmp_path, tiny_mixtral, monkeypatch):
    for name in ("RANK", "WORLD_SIZE"):  # one process
        monkeypatch.delenv(name, raising=False)
    ckpt = tmp_path / "iter_0000002"
    ckpt.mkdir()
    state = {"engine": "deepspeed", "world_size": 2, "zero_stage": 2, "expert_parallel_size": 2}
    (ckpt / "run_state.json").write_text(json.dumps(state))
    cfg = make_config(tmp_path, tiny_mixtral, "unused", "distributed.zero_stage=2")
    check_resume_compatible(cfg, ckpt)  # resharded on resume
    (ckpt / "run_state.json").write_text(json.dumps({**state, "zero_stage": 0}))
    with pytest.raises(
        ValueError, match=r"written with ZeRO stage 0 \(2 processes, ZeRO-0, EP 2\).*not supported"
    ):
        check_resume_compatible(cfg, ckpt)


def test_a_checkpoint_outside_the_save_folder_keeps_its_copy(tmp_path):
    """Only the save folder's resharded copies go with the next checkpoint; a copy next to a checkpoint
    elsewhere (one many runs start from) stays for the next resume."""
    from moe_recipes.train.checkpoint import remove_resharded

    save, other = tmp_path / "save", tmp_path / "other"
    for folder in (
        save / "iter_0000003.resharded",
        other / "iter_0000003.resharded",
        save / "notes.resharded",
    ):
        folder.mkdir(parents=True)
        (folder / "resharded.json").write_text("{}")
    remove_resharded(save)
    assert sorted(os.listdir(save)) == ["notes.resharded"]
    assert (other / "iter_0000003.resharded" / "resharded.json").is_file()
