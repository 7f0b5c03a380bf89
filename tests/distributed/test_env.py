"""detect_env for every launcher's variables (plain dicts), SLURM host lists, precedence and errors;
then init_distributed / export_env in this process (a 1-rank gloo group)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from moe_recipes.distributed.env import (
    DEFAULT_MASTER_PORT,
    DistEnv,
    destroy_distributed,
    detect_env,
    device_for,
    expand_nodelist,
    expand_tasks_per_node,
    export_env,
    init_distributed,
)

JOB_VARS = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "LOCAL_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "CROSS_RANK",
    "OMPI_COMM_WORLD_RANK",
    "PMI_RANK",
    "SLURM_PROCID",
    "SLURM_STEP_ID",
)

TORCHRUN = {
    "RANK": "5",
    "LOCAL_RANK": "1",
    "WORLD_SIZE": "8",
    "LOCAL_WORLD_SIZE": "4",
    "MASTER_ADDR": "node0",
    "MASTER_PORT": "12345",
    "TORCHELASTIC_RUN_ID": "none",
    "GROUP_RANK": "1",
}
OMPI = {
    "OMPI_COMM_WORLD_RANK": "6",
    "OMPI_COMM_WORLD_SIZE": "8",
    "OMPI_COMM_WORLD_LOCAL_RANK": "2",
    "OMPI_COMM_WORLD_LOCAL_SIZE": "4",
}
SLURM = {
    "SLURM_PROCID": "7",
    "SLURM_STEP_ID": "0",
    "SLURM_NTASKS": "8",
    "SLURM_LOCALID": "3",
    "SLURM_NODEID": "1",
    "SLURM_TASKS_PER_NODE": "4(x2)",
    "SLURM_JOB_NODELIST": "gpu[07-08]",
}


def test_no_launcher_is_a_single_process():
    env = detect_env({})
    assert env == DistEnv(
        rank=0,
        local_rank=0,
        world_size=1,
        local_world_size=1,
        master_addr="127.0.0.1",
        master_port=DEFAULT_MASTER_PORT,
        launcher="single",
    )
    assert env.is_main and env.num_nodes == 1
    assert detect_env({"MASTER_PORT": "4242", "MASTER_ADDR": "h1"}).master_port == 4242


def test_torchrun_variables():
    env = detect_env(TORCHRUN)
    assert (env.rank, env.local_rank, env.world_size, env.local_world_size) == (5, 1, 8, 4)
    assert (env.master_addr, env.master_port, env.launcher) == ("node0", 12345, "torchrun")
    assert not env.is_main and env.num_nodes == 2


def test_deepspeed_launcher_variables():
    # The DeepSpeed launcher says LOCAL_SIZE (not LOCAL_WORLD_SIZE) and adds CROSS_RANK/CROSS_SIZE.
    env = detect_env(
        {
            "RANK": "3",
            "LOCAL_RANK": "1",
            "WORLD_SIZE": "4",
            "LOCAL_SIZE": "2",
            "CROSS_RANK": "1",
            "CROSS_SIZE": "2",
            "MASTER_ADDR": "10.0.0.1",
            "MASTER_PORT": "29600",
        }
    )
    assert (env.rank, env.local_rank, env.world_size, env.local_world_size) == (3, 1, 4, 2)
    assert (env.launcher, env.master_addr, env.master_port) == ("deepspeed", "10.0.0.1", 29600)


def test_open_mpi_variables():
    env = detect_env({**OMPI, "MASTER_ADDR": "head", "MASTER_PORT": "2000"})
    assert (env.rank, env.local_rank, env.world_size, env.local_world_size) == (6, 2, 8, 4)
    assert (env.launcher, env.master_addr, env.master_port) == ("openmpi", "head", 2000)


def test_open_mpi_single_node_uses_loopback_without_master_addr():
    env = detect_env(
        {
            "OMPI_COMM_WORLD_RANK": "1",
            "OMPI_COMM_WORLD_SIZE": "2",
            "OMPI_COMM_WORLD_LOCAL_RANK": "1",
            "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
        }
    )
    assert (env.rank, env.world_size, env.master_addr, env.master_port) == (1, 2, "127.0.0.1", 29500)


def test_mpi_multi_node_without_master_addr_is_an_error():
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        detect_env(OMPI)


def test_mpi_inside_slurm_allocation_takes_the_first_node():
    env = detect_env({**OMPI, "SLURM_JOB_NODELIST": "gpu[07-08]"})
    assert (env.launcher, env.rank, env.master_addr) == ("openmpi", 6, "gpu07")


def test_mpi_under_pbs_reads_the_nodefile(tmp_path):
    nodefile = tmp_path / "nodes"
    nodefile.write_text("\ncn17\ncn17\ncn18\n")
    env = detect_env({**OMPI, "PBS_NODEFILE": str(nodefile)})
    assert env.master_addr == "cn17"
    with pytest.raises(FileNotFoundError, match="PBS_NODEFILE"):
        detect_env({**OMPI, "PBS_NODEFILE": str(tmp_path / "missing")})


@pytest.mark.parametrize(
    "local",
    [
        {"MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"},  # MPICH Hydra / Intel MPI
        {"PALS_LOCAL_RANKID": "1", "PALS_LOCAL_SIZE": "2"},  # Cray PALS
    ],
)
def test_mpich_family_variables(local):
    env = detect_env({"PMI_RANK": "3", "PMI_SIZE": "4", **local, "MASTER_ADDR": "x1"})
    assert (env.rank, env.local_rank, env.world_size, env.local_world_size) == (3, 1, 4, 2)
    assert env.launcher == "mpich"


def test_slurm_srun_variables():
    env = detect_env(SLURM)
    assert (env.rank, env.local_rank, env.world_size, env.local_world_size) == (7, 3, 8, 4)
    assert (env.launcher, env.master_addr, env.master_port) == ("slurm", "gpu07", 29500)


def test_slurm_step_values_win_over_job_values():
    # An srun using part of the allocation: the step's task count and node list are the ones that matter.
    env = detect_env(
        {
            **SLURM,
            "SLURM_NTASKS": "16",
            "SLURM_STEP_NUM_TASKS": "8",
            "SLURM_STEP_NODELIST": "gpu[08,11]",
            "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
        }
    )
    assert (env.world_size, env.master_addr) == (8, "gpu08")


def test_slurm_uneven_tasks_per_node():
    base = {
        "SLURM_STEP_ID": "0",
        "SLURM_NTASKS": "7",
        "SLURM_TASKS_PER_NODE": "2(x3),1",
        "SLURM_NODELIST": "a[1-2],b[1-2]",
    }
    last = detect_env({**base, "SLURM_PROCID": "6", "SLURM_LOCALID": "0", "SLURM_NODEID": "3"})
    assert (last.local_world_size, last.master_addr) == (1, "a1")
    first = detect_env({**base, "SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_NODEID": "0"})
    assert first.local_world_size == 2
    assert (
        detect_env(
            {
                **base,
                "SLURM_PROCID": "1",
                "SLURM_LOCALID": "1",
                "SLURM_NODEID": "0",
                "SLURM_NTASKS_PER_NODE": "3",
            }
        ).local_world_size
        == 3
    )
    with pytest.raises(ValueError, match="SLURM_NODEID"):
        detect_env({**base, "SLURM_PROCID": "1", "SLURM_LOCALID": "1"})


def test_sbatch_script_without_srun_is_a_single_process():
    # The batch script itself has SLURM_PROCID=0 and SLURM_NTASKS=N but no job step: it is one process.
    env = detect_env({k: v for k, v in SLURM.items() if k != "SLURM_STEP_ID"} | {"SLURM_PROCID": "0"})
    assert (env.launcher, env.world_size) == ("single", 1)


def test_precedence_torchrun_over_mpi_over_slurm():
    assert detect_env({**SLURM, **OMPI, **TORCHRUN}).launcher == "torchrun"
    env = detect_env({**SLURM, **OMPI})
    assert (env.launcher, env.rank, env.local_rank) == ("openmpi", 6, 2)
    assert detect_env({**SLURM, "PMI_RANK": "2", "PMI_SIZE": "8"}).launcher == "mpich"


def test_master_addr_and_port_from_the_environment_override_derived_values():
    env = detect_env({**SLURM, "MASTER_ADDR": "login3", "MASTER_PORT": "31000"})
    assert (env.master_addr, env.master_port) == ("login3", 31000)


def test_srun_mpi_pmi_without_local_vars_falls_back_to_slurm_localid():
    env = detect_env({**SLURM, "PMI_RANK": "7", "PMI_SIZE": "8", "MASTER_ADDR": "gpu07"})
    assert (env.launcher, env.local_rank) == ("mpich", 3)


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("n1", ["n1"]),
        ("n[1-3]", ["n1", "n2", "n3"]),
        ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
        ("a[1-2],b3", ["a1", "a2", "b3"]),
        ("gpu[01-03,07],cpu5", ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"]),
        ("n[098-101]", ["n098", "n099", "n100", "n101"]),
        ("rack[1-2]-n[1,3]", ["rack1-n1", "rack1-n3", "rack2-n1", "rack2-n3"]),
        ("node-1.cluster,node-2.cluster", ["node-1.cluster", "node-2.cluster"]),
    ],
)
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts
    env = detect_env(
        {
            "OMPI_COMM_WORLD_RANK": "0",
            "OMPI_COMM_WORLD_SIZE": "4",
            "OMPI_COMM_WORLD_LOCAL_RANK": "0",
            "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
            "SLURM_JOB_NODELIST": nodelist,
        }
    )
    assert env.master_addr == hosts[0]


@pytest.mark.parametrize("bad", ["n[1-3", "n1-3]", "n[3-1]", "n[a-c]", "n[[1]]", "", " , "])
def test_bad_nodelist_names_the_variable(bad):
    with pytest.raises(ValueError, match="SLURM_STEP_NODELIST"):
        expand_nodelist(bad, "SLURM_STEP_NODELIST")


def test_expand_tasks_per_node():
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert expand_tasks_per_node("8") == [8]
    with pytest.raises(ValueError, match="SLURM_TASKS_PER_NODE"):
        expand_tasks_per_node("2(x),1")


@pytest.mark.parametrize(
    "environ, variable",
    [
        ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "RANK=2"),
        ({"RANK": "x", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "RANK='x'"),
        ({"RANK": "0", "WORLD_SIZE": "0", "LOCAL_RANK": "0"}, "WORLD_SIZE=0"),
        ({"RANK": "0", "LOCAL_RANK": "0"}, "WORLD_SIZE"),
        ({"WORLD_SIZE": "2"}, "RANK"),
        ({"RANK": "1", "WORLD_SIZE": "2"}, "LOCAL_RANK"),
        ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2"}, "LOCAL_RANK=2"),
        ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}, "LOCAL_WORLD_SIZE=4"),
        ({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "node0"}, "LOCAL_WORLD_SIZE"),
        ({"RANK": "0", "WORLD_SIZE": "1", "MASTER_PORT": "70000"}, "MASTER_PORT=70000"),
        ({"OMPI_COMM_WORLD_RANK": "0"}, "OMPI_COMM_WORLD_SIZE"),
        (
            {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "0"},
            "OMPI_COMM_WORLD_RANK=3",
        ),
        ({"PMI_RANK": "1", "PMI_SIZE": "2"}, "MPI_LOCALRANKID"),
        ({**SLURM, "SLURM_LOCALID": "4"}, "SLURM_LOCALID=4"),
        ({**SLURM, "SLURM_NODEID": "2"}, "SLURM_NODEID=2"),
        ({k: v for k, v in SLURM.items() if k != "SLURM_NTASKS"}, "SLURM_NTASKS"),
    ],
)
def test_inconsistent_values_raise_naming_the_variable(environ, variable):
    with pytest.raises(ValueError, match=variable.replace("(", r"\(")):
        detect_env(environ)


@pytest.fixture
def clean_job_env():
    """No launcher variables in os.environ during the test, the original ones back afterwards (whatever
    the test exported), and no process group left before or behind (in-process training tests leave one)."""
    destroy_distributed()
    saved = {name: os.environ.pop(name) for name in JOB_VARS if name in os.environ}
    yield
    destroy_distributed()
    for name in JOB_VARS:
        os.environ.pop(name, None)
    os.environ.update(saved)


def test_export_env_round_trips_through_detect_env(clean_job_env):
    env = detect_env(TORCHRUN)
    export_env(env)
    assert {k: os.environ[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")} == {
        "RANK": "5",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "8",
        "LOCAL_WORLD_SIZE": "4",
    }
    assert detect_env() == env


def test_init_distributed_single_process_group(clean_job_env):
    env = init_distributed(use_deepspeed=False)
    assert dist.is_initialized() and dist.get_world_size() == 1 and dist.get_backend() == "gloo"
    assert (env.launcher, env.world_size, env.master_addr) == ("single", 1, "127.0.0.1")
    # A free port was picked and exported, so torch's env:// rendezvous and later readers agree.
    assert os.environ["MASTER_PORT"] == str(env.master_port) and os.environ["RANK"] == "0"
    assert init_distributed(use_deepspeed=False) is env  # idempotent
    t = torch.tensor([3.0])
    dist.all_reduce(t)
    assert t.item() == 3.0
    assert device_for(env) == (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    destroy_distributed()
    assert not dist.is_initialized()
    assert "RANK" not in os.environ and "MASTER_PORT" not in os.environ  # restored
    assert init_distributed(use_deepspeed=False).launcher == "single"  # a later init starts afresh


def test_init_distributed_rejects_nccl_without_cuda(clean_job_env):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ValueError, match="nccl"):
        init_distributed(backend="nccl", use_deepspeed=False)
    assert not dist.is_initialized()
