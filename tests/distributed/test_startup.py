"""Start-up never hangs silently: a rendezvous with a missing rank or an unreachable master fails in bounded
time naming the address, and a wait on a PyTorch extension build lock is bounded and explained."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from moe_recipes.distributed.startup import (
    ExtensionLockTimeout,
    bounded_extension_builds,
    describe_lock,
    lock_holders,
    wait_for_lock,
)
from tests.harness import _child_environ, free_port

pytestmark = pytest.mark.distributed

from ..train.utils import write_config  # noqa: E402

HOLD_LOCK = (
    "import os, sys, time; fd = os.open(sys.argv[1], os.O_CREAT | os.O_EXCL); print('held', flush=True); "
    "time.sleep(float(sys.argv[2])); os.close(fd); os.remove(sys.argv[1])"
)


@pytest.fixture
def holder(tmp_path):
    """Start a process that creates `lock` as torch's FileBaton does and holds it for `seconds`."""
    procs = []

    def start(seconds: float) -> tuple[Path, subprocess.Popen]:
        lock = tmp_path / "lock"
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLD_LOCK, str(lock), str(seconds)], stdout=subprocess.PIPE, text=True
        )
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return lock, proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


# ---- extension build locks -------------------------------------------------------------------------


def test_a_stale_lock_times_out_naming_the_lock_and_the_fix(tmp_path, capsys):
    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir()
    lock.touch()  # what an interrupted build leaves behind
    assert lock_holders(lock) == []
    start = time.monotonic()
    with pytest.raises(ExtensionLockTimeout) as info:
        wait_for_lock(str(lock), timeout_s=1.5, notice_every_s=0.5)
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert str(lock) in message and f"rm {lock}" in message and "held by no process on this host" in message
    assert "init_timeout_minutes" in message
    assert f"lock {lock}" in capsys.readouterr().err  # said so while waiting
    assert lock.exists()  # not ours to delete: a build on another node would look the same


def test_a_live_build_is_waited_for_and_reported_with_its_pid(holder, capsys):
    lock, proc = holder(2.5)
    assert lock_holders(lock) == [proc.pid]
    assert f"held by a build running as pid {proc.pid}" in describe_lock(lock)
    start = time.monotonic()
    wait_for_lock(str(lock), timeout_s=30, notice_every_s=0.5)
    assert 1 < time.monotonic() - start < 20
    err = capsys.readouterr().err
    assert f"pid {proc.pid}" in err and "waiting for another process to finish building" in err


def test_a_live_build_that_outlasts_the_timeout_fails(holder):
    lock, proc = holder(60)
    with pytest.raises(ExtensionLockTimeout, match=f"pid {proc.pid}"):
        wait_for_lock(str(lock), timeout_s=1, notice_every_s=10)


def test_bounded_extension_builds_patches_torchs_file_baton_only_while_active(tmp_path):
    from torch.utils.file_baton import FileBaton

    original = FileBaton.wait
    lock = tmp_path / "lock"
    lock.touch()
    with bounded_extension_builds(timeout_s=0.5), pytest.raises(ExtensionLockTimeout, match="lock"):
        FileBaton(str(lock)).wait()  # what torch.utils.cpp_extension.load does when another build holds it
    assert FileBaton.wait is original


# ---- rendezvous ------------------------------------------------------------------------------------


def _start_one_rank(argv: list[str], rank: int, port: int) -> tuple[subprocess.CompletedProcess, float]:
    """Run rank `rank` of a 2-rank job of one rank per node alone and return (result, seconds)."""
    environ = _child_environ(
        {
            "RANK": str(rank),
            "LOCAL_RANK": "0",
            "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "moe_recipes.cli", *argv],
        env=environ,
        capture_output=True,
        text=True,
        timeout=90,
    )
    return result, time.monotonic() - start


def test_a_rendezvous_that_cannot_complete_fails_in_bounded_time(tmp_path, tiny_mixtral, tiny_dataset):
    """Rank 0 alone waits for a rank that never comes; rank 1 alone finds nobody at MASTER_ADDR:PORT. Two
    separate jobs on their own ports, started together (each mostly waits)."""
    config = write_config(tmp_path, tiny_mixtral, tiny_dataset, "distributed.init_timeout_minutes=0.1")
    ports = {0: free_port(), 1: free_port()}
    with ThreadPoolExecutor(2) as pool:
        done = dict(
            zip(ports, pool.map(lambda r: _start_one_rank(["train", str(config)], r, ports[r]), ports))
        )
    for rank, (result, seconds) in done.items():
        err = result.stderr
        assert result.returncode != 0, (rank, err[-3000:])
        assert f"MASTER_ADDR:MASTER_PORT=127.0.0.1:{ports[rank]}" in err, err[-3000:]
        assert "world size 2" in err and "6 s" in err and "distributed.init_timeout_minutes=0.1" in err
        assert "still waiting for all 2 ranks to join" in err  # said so while it waited
        assert seconds < 60


def test_init_timeout_must_be_positive():
    from moe_recipes.config import DistributedConfig

    with pytest.raises(ValueError, match="distributed.init_timeout_minutes must be > 0"):
        DistributedConfig(init_timeout_minutes=0).validate()


def test_the_notice_names_the_wait(capsys):
    from moe_recipes.distributed.startup import waiting_notice

    with waiting_notice("waited {elapsed:.1f} s", first_after_s=0.1, every_s=0.1):
        time.sleep(0.35)
    assert capsys.readouterr().err.count("waited") >= 2
    assert not [
        t for t in threading.enumerate() if t.name == "moe-recipes-wait-notice"
    ]  # ended with the block


# ---- a whole run with a stale lock -----------------------------------------------------------------


def _extension_build_dir(extensions_dir: Path, name: str, monkeypatch) -> Path:
    """Where torch.utils.cpp_extension.load builds `name` under TORCH_EXTENSIONS_DIR=extensions_dir."""
    from torch.utils import cpp_extension

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(extensions_dir))
    return Path(cpp_extension._get_build_directory(name, verbose=False))


def test_deepspeed_training_starts_despite_a_stale_extension_lock(
    tmp_path, tiny_mixtral, tiny_dataset, monkeypatch
):
    """The lock an interrupted build of DeepSpeed's CPU shm op leaves made every later run hang in
    FileBaton.wait; a 2-process ZeRO-2 run must now train (or stop naming the lock), not hang."""
    from tests.harness import run_cli_distributed

    from ..train.utils import step_records

    extensions = tmp_path / "torch_extensions"
    build_dir = _extension_build_dir(extensions, "deepspeed_shm_comm", monkeypatch)
    lock = build_dir / "lock"
    lock.touch()  # an empty build folder but for the lock: the build was killed right after it started
    config = write_config(
        tmp_path,
        tiny_mixtral,
        tiny_dataset,
        "train.iters=3",
        "eval.interval=100",
        "distributed.zero_stage=2",
        "distributed.init_timeout_minutes=1",
    )
    start = time.monotonic()
    out = run_cli_distributed(
        ["train", str(config)],
        world_size=2,
        launcher="torchrun",
        timeout=120,  # fails the test instead of hanging it
        env={"TORCH_EXTENSIONS_DIR": str(extensions)},
    )
    assert time.monotonic() - start < 120
    assert "2 process(es) (torchrun), ZeRO-2" in out.stdout
    assert sorted(step_records(tmp_path / "run")) == [1, 2, 3]
    assert lock.exists() and list(build_dir.iterdir()) == [lock]  # nothing built, nothing waited on
