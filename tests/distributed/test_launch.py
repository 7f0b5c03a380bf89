"""Real multi-process runs: run_distributed itself, the probe under torchrun / mpirun / the deepspeed
launcher, and run_cli_distributed with the real CLI."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.harness import (
    DIRECT,
    DistributedRunError,
    LaunchError,
    launch_command,
    run_cli_distributed,
    run_distributed,
    run_module_distributed,
)

pytestmark = pytest.mark.distributed

HAS_MPIRUN = shutil.which("mpirun") is not None
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


# ---- functions run on every rank (module level, so that they pickle) --------------------------------


def _rank_report(scale: float, *, offset: int = 0) -> dict:
    """All-reduce rank*scale and report what this rank saw."""
    t = torch.tensor([dist.get_rank() * scale])
    dist.all_reduce(t)
    return {
        "rank": dist.get_rank() + offset,
        "world": dist.get_world_size(),
        "sum": t.item(),
        "env_rank": os.environ["RANK"],
        "omp": os.environ["OMP_NUM_THREADS"],
        "pid": os.getpid(),
    }


def _fail_on_rank_1() -> None:
    if dist.get_rank() == 1:
        raise ValueError("bad value on rank 1")
    dist.barrier()  # rank 0 would wait here for ever if nobody cleaned up


def _hang_on_rank_1(pid_dir: str) -> int:
    Path(pid_dir, f"rank{dist.get_rank()}").write_text(str(os.getpid()))
    if dist.get_rank() == 1:
        time.sleep(600)
    return dist.get_rank()


def _crash_on_rank_0() -> None:
    # Both ranks are connected first: rank 0 dying inside the rendezvous made rank 1 fail there at the same
    # moment, and which failure came first was then a race. Rank 1 stays silent until it is killed.
    dist.barrier()
    if dist.get_rank() == 0:
        os._exit(3)
    time.sleep(60)


# ---- run_distributed -------------------------------------------------------------------------------


def test_run_distributed_returns_values_in_rank_order():
    out = run_distributed(_rank_report, 2, 3.0, offset=10, timeout=120)
    assert [r["rank"] for r in out] == [10, 11]
    assert all(r["world"] == 2 and r["sum"] == 3.0 for r in out)  # 3 * (0 + 1)
    assert [r["env_rank"] for r in out] == ["0", "1"]
    assert len({r["pid"] for r in out} | {os.getpid()}) == 3  # two fresh processes
    assert all(r["omp"] == os.environ.get("OMP_NUM_THREADS", "1") for r in out)


def test_run_distributed_reraises_the_failing_ranks_exception():
    with pytest.raises(ValueError, match="bad value on rank 1") as info:
        run_distributed(_fail_on_rank_1, 2, timeout=120)
    cause = info.value.__cause__
    assert isinstance(cause, DistributedRunError)
    assert "rank 1 of 2" in str(cause) and "Traceback" in str(cause) and "_fail_on_rank_1" in str(cause)


def test_run_distributed_kills_a_hung_rank(tmp_path):
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"rank\(s\) \[(0, )?1\]"):
        run_distributed(_hang_on_rank_1, 2, str(tmp_path), timeout=10)
    assert time.monotonic() - start < 30
    pid = int((tmp_path / "rank1").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_direct_start_sets_each_rank_and_reports_a_failed_one(tmp_path):
    """launcher=DIRECT: every rank gets its RANK/WORLD_SIZE/MASTER_*; outputs come back in rank order; a
    rank's non-zero exit raises LaunchError with the ranks' output, and no rank is left running."""
    (tmp_path / "rank_env.py").write_text(
        "import os, sys\n"
        "r = os.environ['RANK']\n"
        "print(r, os.environ['LOCAL_RANK'], os.environ['WORLD_SIZE'], os.environ['MASTER_PORT'], sys.argv[1])\n"
        "if sys.argv[1] == 'fail' and r == '1':\n"
        "    print('rank 1 fails', file=sys.stderr); sys.exit(3)\n"
        "if sys.argv[1] == 'fail':\n"
        "    import time; time.sleep(60)\n"
    )
    env = {"PYTHONPATH": str(tmp_path)}
    out = run_module_distributed("rank_env", ["ok"], 3, launcher=DIRECT, env=env, timeout=60)
    rows = [line.split() for line in out.stdout.splitlines()]
    assert [r[:3] for r in rows] == [["0", "0", "3"], ["1", "1", "3"], ["2", "2", "3"]]
    assert len({r[3] for r in rows}) == 1  # one MASTER_PORT for the job
    start = time.monotonic()
    with pytest.raises(LaunchError, match="rank 1 fails") as failed:
        run_module_distributed("rank_env", ["fail"], 2, launcher=DIRECT, env=env, timeout=60)
    assert failed.value.returncode == 3
    assert time.monotonic() - start < 30  # rank 0 (asleep) was killed after the grace period


def test_run_distributed_reports_a_rank_that_dies_without_a_result():
    with pytest.raises(DistributedRunError, match="rank 0 of 2 exited with code 3"):
        run_distributed(_crash_on_rank_0, 2, timeout=120)


def test_run_distributed_rejects_what_cannot_pickle():
    with pytest.raises(ValueError, match="picklable"):
        run_distributed(lambda: 1, 2)
    with pytest.raises(ValueError, match="world_size"):
        run_distributed(_rank_report, 0, 1.0)


# ---- real launchers --------------------------------------------------------------------------------


def test_launch_commands(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda prog: f"/opt/bin/{prog}")
    argv = ["train", "cfg.yaml", "train.iters=3"]
    torchrun = launch_command("torchrun", "moe_recipes.cli", argv, 3, 1234)
    assert "--nproc_per_node=3" in torchrun and "--master_port=1234" in torchrun
    assert torchrun[-5:] == ["-m", "moe_recipes.cli", *argv]
    mpirun = launch_command("mpirun", "moe_recipes.cli", argv, 3, 1234, export=["FOO"])
    assert mpirun[0] == "/opt/bin/mpirun" and mpirun[mpirun.index("-np") + 1] == "3"
    assert "MASTER_PORT=1234" in mpirun and mpirun[mpirun.index("FOO") - 1] == "-x"
    deepspeed = launch_command("deepspeed", "moe_recipes.cli", argv, 2, 99)
    assert "--no_local_rank" in deepspeed and deepspeed[-5:] == ["--module", "moe_recipes.cli", *argv]
    assert launch_command("srun", "m", [], 4, 1)[:2] == ["/opt/bin/srun", "--ntasks=4"]
    with pytest.raises(ValueError, match="launcher='pdsh'"):
        launch_command("pdsh", "m", [], 2, 1)
    monkeypatch.setattr(shutil, "which", lambda prog: None)
    with pytest.raises(FileNotFoundError, match="mpirun"):
        launch_command("mpirun", "m", [], 2, 1)


@pytest.mark.parametrize(
    "launcher, use_deepspeed, label",
    [
        ("torchrun", False, "torchrun"),
        pytest.param(
            "mpirun",
            True,
            "openmpi",
            marks=pytest.mark.skipif(
                not (HAS_MPIRUN and HAS_DEEPSPEED), reason="mpirun or deepspeed missing"
            ),
        ),
        pytest.param(
            "deepspeed",
            True,
            "deepspeed",
            marks=pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed"),
        ),
    ],
)
def test_probe_under_a_real_launcher(tmp_path, launcher, use_deepspeed, label):
    argv = ["--out", str(tmp_path)] + (["--use-deepspeed"] if use_deepspeed else [])
    proc = run_module_distributed("moe_recipes.distributed.probe", argv, 2, launcher, timeout=300)
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["rank"] for r in records] == [0, 1]
    assert {r["local_rank"] for r in records} == {0, 1}
    for r in records:
        assert (r["world_size"], r["local_world_size"], r["group_size"]) == (2, 2, 2)
        assert (r["launcher"], r["backend"], r["deepspeed"]) == (label, "gloo", use_deepspeed)
        assert r["sum"] == r["expected_sum"] == 1.0
        assert r["peers"] == records[0]["peers"]  # every rank gathered the same view
    assert records[0]["master_port"] == records[1]["master_port"]
    assert records[0]["pid"] != records[1]["pid"]
    assert len(re.findall(r"^PROBE ", proc.stdout, flags=re.M)) == 2


def test_run_cli_distributed_runs_the_cli_on_every_rank():
    out = run_cli_distributed(["--help"], world_size=2, launcher="torchrun", timeout=300)
    assert out.stdout.count("usage: moe-recipes") == 2


def test_a_failing_launch_raises_with_its_output(tmp_path):
    missing = tmp_path / "missing.json"
    with pytest.raises(LaunchError, match="missing.json") as info:
        run_module_distributed("json.tool", [str(missing)], world_size=2, launcher="torchrun", timeout=300)
    assert info.value.returncode != 0


# ---- cluster scripts (DRY_RUN=1 prints the command they would run) -----------------------------------

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def _dry_run(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "NNODES")}
    return subprocess.run(
        ["bash", str(SCRIPTS / script), *args],
        env={**environ, "DRY_RUN": "1", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_scripts_are_executable_and_parse():
    scripts = sorted(SCRIPTS.glob("*_multinode.*"))
    assert {p.name for p in scripts} >= {
        "torchrun_multinode.sh",
        "deepspeed_multinode.sh",
        "mpirun_multinode.sh",
        "slurm_multinode.sbatch",
    }
    for path in scripts:
        assert os.access(path, os.X_OK), path
        assert subprocess.run(["bash", "-n", str(path)]).returncode == 0, path
        assert _dry_run(path.name).returncode == 2  # no CONFIG: usage error


def test_torchrun_script():
    out = _dry_run(
        "torchrun_multinode.sh",
        "cfg.yaml",
        "train.iters=5",
        NNODES="2",
        NODE_RANK="1",
        MASTER_ADDR="node0",
        GPUS_PER_NODE="4",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [
        "torchrun",
        "--nnodes=2",
        "--node_rank=1",
        "--nproc_per_node=4",
        "--master_addr=node0",
        "--master_port=29500",
        "--no-python",
        "moe-recipes",
        "train",
        "cfg.yaml",
        "train.iters=5",
    ]
    refused = _dry_run("torchrun_multinode.sh", "cfg.yaml", NNODES="2", GPUS_PER_NODE="4")
    assert refused.returncode == 2 and "MASTER_ADDR" in refused.stderr


def test_deepspeed_and_mpirun_scripts_read_the_hostfile(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# cluster\n\nnodeA slots=2\nnodeB slots=2\nnodeC slots=2\n")
    ds = _dry_run("deepspeed_multinode.sh", "cfg.yaml", "a=1", HOSTFILE=str(hostfile))
    assert ds.returncode == 0, ds.stderr
    assert (
        f"--hostfile={hostfile}" in ds.stdout
        and "--no_local_rank --module moe_recipes.cli train cfg.yaml a=1" in ds.stdout
    )
    mpi = _dry_run(
        "mpirun_multinode.sh",
        "cfg.yaml",
        "a=1",
        HOSTFILE=str(hostfile),
        NNODES="2",
        GPUS_PER_NODE="2",
        MPIRUN_ARGS="-x HF_HOME",
    )
    assert mpi.returncode == 0, mpi.stderr
    words = mpi.stdout.split()
    assert "MASTER_ADDR=nodeA" in words and words[words.index("-np") + 1] == "4"
    assert words[words.index("--npernode") + 1] == "2" and words[-4:] == [
        "moe-recipes",
        "train",
        "cfg.yaml",
        "a=1",
    ]
    assert "-x HF_HOME" in mpi.stdout and "-x MASTER_ADDR" in mpi.stdout
    missing = _dry_run("mpirun_multinode.sh", "cfg.yaml", HOSTFILE=str(tmp_path / "nope"))
    assert missing.returncode == 2 and "hostfile" in missing.stderr


def test_slurm_script_derives_a_port_from_the_job_id():
    out = _dry_run(
        "slurm_multinode.sbatch",
        "cfg.yaml",
        "a=1",
        SLURM_JOB_ID="123456",
        SLURM_CPUS_PER_TASK="6",
        OMP_NUM_THREADS="",
    )
    assert out.returncode == 0, out.stderr
    assert "MASTER_PORT=23456" in out.stdout.split() and "OMP_NUM_THREADS=6" in out.stdout.split()
    assert out.stdout.split()[-4:] == ["moe-recipes", "train", "cfg.yaml", "a=1"]
    assert "#SBATCH --ntasks-per-node=" in (SCRIPTS / "slurm_multinode.sbatch").read_text()
