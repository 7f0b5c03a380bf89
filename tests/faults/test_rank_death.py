"""A rank dies (kill -9 of one of two processes): the other exits non-zero in bounded time, never hangs.

Two launch shapes: torchrun, whose agent notices the death and must say which rank failed; and two plain
processes (as mpirun or srun start them, without an agent that stops the survivor), where the survivor
must stop by itself within distributed.timeout_minutes.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from moe_recipes.distributed.env import find_free_port

from .utils import KILLED, child_env, config_file, run_training

TIMEOUT_MINUTES = 0.25  # distributed.timeout_minutes of these runs: 15 s
POINTS = ["step_start", "before_reduce"]  # in the step; inside the step's loss all-reduce (rank 0 waits)


def _points(default: str) -> list:
    """Both points, `default` in `make test` and the other under `make test-slow` (each launch costs the
    suite most of a minute on two cores)."""
    return [p if p == default else pytest.param(p, marks=pytest.mark.slow) for p in POINTS]


def _config(tmp_path, tiny_mixtral, tiny_dataset):
    return config_file(
        tmp_path, tiny_mixtral, tiny_dataset, "train.iters=6", "eval.iters=0", "distributed.zero_stage=2",
        f"distributed.timeout_minutes={TIMEOUT_MINUTES}",
    )  # fmt: skip


# torchrun's agent sees a rank's exit wherever in the step it happens
@pytest.mark.parametrize("point", _points("step_start"))
def test_torchrun_reports_the_rank_that_died(tmp_path, tiny_mixtral, tiny_dataset, point):
    config = _config(tmp_path, tiny_mixtral, tiny_dataset)
    start = time.monotonic()
    code, out = run_training(config, 2, fault=f"point={point},iter=3,rank=1", timeout=300)
    took = time.monotonic() - start
    assert code != 0, out[-3000:]
    assert f"fault injection: kill at {point}, step 3, rank 1" in out
    assert "rank      : 1" in out and f"exitcode  : {KILLED}" in out  # torchrun's failure summary
    assert "step 2/6" in out and "step 3/6" not in out
    assert took < 120, f"took {took:.0f} s"


# before_reduce: the survivor is already waiting in the all-reduce when its peer dies, the case that would
# hang without a bounded timeout; step_start (it reaches a collective after the death) runs in test-slow
@pytest.mark.parametrize("point", _points("before_reduce"))
def test_survivor_without_an_agent_stops_by_itself(tmp_path, tiny_mixtral, tiny_dataset, point):
    config = _config(tmp_path, tiny_mixtral, tiny_dataset)
    port = find_free_port()
    procs = []
    for rank in (0, 1):
        env = child_env(f"point={point},iter=3,rank=1")
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "moe_recipes.cli", "train", str(config)],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=env,
            )  # fmt: skip
        )
    survivor, victim = procs
    victim_out, _ = victim.communicate(timeout=300)
    died = time.monotonic()
    try:
        out, _ = survivor.communicate(timeout=TIMEOUT_MINUTES * 60 + 60)
    except subprocess.TimeoutExpired:
        survivor.kill()
        pytest.fail(f"rank 0 still running {TIMEOUT_MINUTES * 60 + 60:.0f} s after rank 1 died (a hang)")
    assert victim.returncode == KILLED, victim_out[-2000:]
    assert survivor.returncode != 0, out[-3000:]
    assert time.monotonic() - died < TIMEOUT_MINUTES * 60 + 60
    assert "step 2/6" in out and "step 3/6" not in out
    print(out[-1500:])
