"""Process-group set-up from whatever launched this process: torchrun, DeepSpeed, mpirun, srun or nothing.

Every launcher describes "who am I" with its own environment variables. `detect_env` reads them into one
`DistEnv`, `export_env` writes that back as the torch-style variables (RANK, WORLD_SIZE, ...) that
`torch.distributed` and DeepSpeed read, and `init_distributed` does both and creates the process group.

Precedence (first match wins):
1. explicit RANK / WORLD_SIZE (torchrun, the DeepSpeed launcher, `run_distributed`, a user's own script);
   a torchrun started inside an sbatch job therefore wins over the SLURM variables it inherits;
2. MPI: Open MPI (OMPI_COMM_WORLD_*), then MPICH / Intel MPI / Cray PALS (PMI_RANK, PMI_SIZE);
3. SLURM, only inside an srun job step (SLURM_STEP_ID set); a plain `python` in an sbatch script is one
   process, not rank 0 of SLURM_NTASKS that would wait for peers which never come;
4. otherwise a single process.

MASTER_ADDR / MASTER_PORT from the environment override anything derived. Without MASTER_ADDR a job whose
ranks all sit on one node uses 127.0.0.1; a multi-node job takes the first host of the SLURM node list
(or of $PBS_NODEFILE), where rank 0 runs with the default block placement.
"""

from __future__ import annotations

import itertools
import os
import re
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist

from moe_recipes.distributed.startup import waiting_notice

DEFAULT_MASTER_PORT = 29500
DEFAULT_INIT_TIMEOUT_MINUTES = 5.0  # the rendezvous at start; collectives have their own timeout
LOOPBACK = "127.0.0.1"
LAUNCHERS = ("single", "torchrun", "deepspeed", "openmpi", "mpich", "slurm")

# (rank, size, local rank, local size) variables per MPI flavour. The local ones are lists of
# alternatives: Intel MPI and MPICH's Hydra set MPI_LOCAL*, Cray PMI sets PMI_LOCAL_*, PALS sets PALS_*.
_OMPI_VARS = (
    "OMPI_COMM_WORLD_RANK",
    "OMPI_COMM_WORLD_SIZE",
    ("OMPI_COMM_WORLD_LOCAL_RANK",),
    ("OMPI_COMM_WORLD_LOCAL_SIZE",),
)
_PMI_VARS = (
    "PMI_RANK",
    "PMI_SIZE",
    ("MPI_LOCALRANKID", "PMI_LOCAL_RANK", "PALS_LOCAL_RANKID"),
    ("MPI_LOCALNRANKS", "PMI_LOCAL_SIZE", "PALS_LOCAL_SIZE"),
)


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job: global and node-local rank and size, rendezvous address."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str  # one of LAUNCHERS

    @property
    def is_main(self) -> bool:
        """True on global rank 0, the rank that logs, saves configs and writes single-writer files."""
        return self.rank == 0

    @property
    def num_nodes(self) -> int:
        """Number of nodes, assuming the same number of ranks on every node (rounded up otherwise)."""
        return -(-self.world_size // self.local_world_size)


# ----------------------------------------------------------------------------------------------
# Parsing helpers
# ----------------------------------------------------------------------------------------------


def _int_var(environ: Mapping[str, str], name: str, minimum: int = 0) -> int:
    """Read `name` as an integer >= minimum, or raise ValueError naming the variable and its value."""
    raw = environ[name].strip()
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={environ[name]!r} is not an integer") from None
    if value < minimum:
        raise ValueError(f"environment variable {name}={value} must be >= {minimum}")
    return value


def _first_int(
    environ: Mapping[str, str], names: tuple[str, ...], minimum: int = 0
) -> tuple[int, str] | None:
    """The first of `names` that is set, as (value, name); None when none is set."""
    for name in names:
        if environ.get(name, "").strip():
            return _int_var(environ, name, minimum), name
    return None


def _split_top_level(text: str, var: str) -> list[str]:
    """Split on commas that are not inside [...] ("a[1,2],b" -> ["a[1,2]", "b"])."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if depth < 0 or depth > 1:
            raise ValueError(f"{var}={text!r}: unbalanced or nested brackets")
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"{var}={text!r}: unbalanced brackets")
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _expand_range_list(body: str, text: str, var: str) -> list[str]:
    """Expand "01-03,07" into ["01", "02", "03", "07"], keeping the zero padding of each range's start."""
    out = []
    for item in body.split(","):
        item = item.strip()
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if not match:
            raise ValueError(f"{var}={text!r}: bad range {item!r} inside [...]")
        lo, hi = match.group(1), match.group(2) or match.group(1)
        if int(hi) < int(lo):
            raise ValueError(f"{var}={text!r}: range {item!r} runs backwards")
        out.extend(str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1))
    return out


def expand_nodelist(nodelist: str, var: str = "SLURM_JOB_NODELIST") -> list[str]:
    """Expand a SLURM host list ("gpu[01-03,07],cpu5", "rack[1-2]-n[1-2]") into host names, in order.

    Parsed in Python so that no `scontrol show hostnames` is needed (it is missing inside many containers).
    `var` only names the variable in error messages.
    """
    hosts: list[str] = []
    for pattern in _split_top_level(nodelist.strip(), var):
        # Alternate literal text and [...] groups; several groups give their cartesian product.
        pieces = re.split(r"\[([^\[\]]*)\]", pattern)
        if any(c in piece for piece in pieces[0::2] for c in "[]"):
            raise ValueError(f"{var}={nodelist!r}: unbalanced brackets in {pattern!r}")
        choices = [[p] if i % 2 == 0 else _expand_range_list(p, nodelist, var) for i, p in enumerate(pieces)]
        hosts.extend("".join(combo) for combo in itertools.product(*choices))
    if not hosts:
        raise ValueError(f"{var}={nodelist!r} names no host")
    return hosts


def expand_tasks_per_node(value: str, var: str = "SLURM_TASKS_PER_NODE") -> list[int]:
    """Expand SLURM's compressed per-node counts: "2(x3),1" -> [2, 2, 2, 1]."""
    counts: list[int] = []
    for item in value.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if not match:
            raise ValueError(f"{var}={value!r}: cannot parse {item!r} (expected N or N(xM))")
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts


# ----------------------------------------------------------------------------------------------
# Per-launcher readers
# ----------------------------------------------------------------------------------------------


class _Read(NamedTuple):
    """What one launcher's variables say, with the variable each value came from (for error messages)."""

    rank: int
    local_rank: int
    world: int
    local_size: int  # -1 when the launcher does not say
    launcher: str
    rank_var: str
    local_rank_var: str
    world_var: str
    local_size_var: str


def _from_torch_vars(environ: Mapping[str, str]) -> _Read:
    """torchrun, the DeepSpeed launcher (which says LOCAL_SIZE instead of LOCAL_WORLD_SIZE) or by hand."""
    for name, other in (("RANK", "WORLD_SIZE"), ("WORLD_SIZE", "RANK")):
        if not environ.get(name, "").strip():
            raise ValueError(f"environment variable {other} is set but {name} is not; set both")
    rank = _int_var(environ, "RANK")
    world = _int_var(environ, "WORLD_SIZE", minimum=1)
    local = _first_int(environ, ("LOCAL_RANK",))
    if local is None and world > 1:
        raise ValueError(f"LOCAL_RANK is not set (RANK={rank}, WORLD_SIZE={world}); it picks the device")
    size = _first_int(environ, ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"), minimum=1)
    launcher = "deepspeed" if "CROSS_RANK" in environ else "torchrun"
    return _Read(
        rank,
        local[0] if local else rank,
        world,
        size[0] if size else -1,
        launcher,
        "RANK",
        "LOCAL_RANK",
        "WORLD_SIZE",
        size[1] if size else "LOCAL_WORLD_SIZE",
    )


def _from_mpi_vars(environ: Mapping[str, str], names: tuple, launcher: str) -> _Read:
    """Open MPI or an MPICH-family launcher; SLURM's node-local variables fill gaps under srun --mpi."""
    rank_var, size_var, local_rank_vars, local_size_vars = names
    if not environ.get(size_var, "").strip():
        raise ValueError(f"{rank_var} is set but {size_var} is not: cannot tell the world size")
    rank = _int_var(environ, rank_var)
    world = _int_var(environ, size_var, minimum=1)
    local = _first_int(environ, (*local_rank_vars, "SLURM_LOCALID"))
    if local is None and world > 1:
        raise ValueError(
            f"{local_rank_vars[0]} is not set ({rank_var}={rank}, {size_var}={world}): "
            "cannot tell the node-local rank"
        )
    size = _first_int(environ, local_size_vars, minimum=1)
    if size is None and "SLURM_LOCALID" in environ:
        size = _slurm_local_size(environ)
    return _Read(
        rank,
        local[0] if local else rank,
        world,
        size[0] if size else -1,
        launcher,
        rank_var,
        local[1] if local else local_rank_vars[0],
        size_var,
        size[1] if size else local_size_vars[0],
    )


def _slurm_local_size(environ: Mapping[str, str]) -> tuple[int, str]:
    """Ranks on this node: SLURM_NTASKS_PER_NODE, else this node's entry of the (step) tasks-per-node list."""
    fixed = _first_int(environ, ("SLURM_NTASKS_PER_NODE",), minimum=1)
    if fixed:
        return fixed
    for var in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        if environ.get(var, "").strip():
            counts = expand_tasks_per_node(environ[var], var)
            node = _first_int(environ, ("SLURM_NODEID",))
            if node is None:
                if len(set(counts)) > 1:
                    raise ValueError(f"{var}={environ[var]!r} differs per node and SLURM_NODEID is not set")
                return counts[0], var
            if node[0] >= len(counts):
                raise ValueError(
                    f"SLURM_NODEID={node[0]} is past the {len(counts)} nodes of {var}={environ[var]!r}"
                )
            return counts[node[0]], var
    return -1, "SLURM_NTASKS_PER_NODE"


def _from_slurm_vars(environ: Mapping[str, str]) -> _Read:
    """An srun job step: SLURM_PROCID / SLURM_STEP_NUM_TASKS (or SLURM_NTASKS) / SLURM_LOCALID."""
    rank = _int_var(environ, "SLURM_PROCID")
    size = _first_int(environ, ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS"), minimum=1)
    if size is None:
        raise ValueError("SLURM_PROCID is set but none of SLURM_STEP_NUM_TASKS / SLURM_NTASKS is")
    local = _first_int(environ, ("SLURM_LOCALID",))
    if local is None and size[0] > 1:
        raise ValueError(f"SLURM_LOCALID is not set (SLURM_PROCID={rank}): cannot tell the node-local rank")
    local_size, local_size_var = _slurm_local_size(environ)
    return _Read(
        rank,
        local[0] if local else rank,
        size[0],
        local_size,
        "slurm",
        "SLURM_PROCID",
        "SLURM_LOCALID",
        size[1],
        local_size_var,
    )


def _in_srun_step(environ: Mapping[str, str]) -> bool:
    """srun sets SLURM_STEP_ID; the batch script of sbatch (one process) does not."""
    return "SLURM_PROCID" in environ and any(v in environ for v in ("SLURM_STEP_ID", "SLURM_STEPID"))


def _read_ranks(environ: Mapping[str, str]) -> _Read:
    """Apply the precedence of the module docstring."""
    if "RANK" in environ or "WORLD_SIZE" in environ:
        return _from_torch_vars(environ)
    if "OMPI_COMM_WORLD_RANK" in environ:
        return _from_mpi_vars(environ, _OMPI_VARS, "openmpi")
    if "PMI_RANK" in environ:
        return _from_mpi_vars(environ, _PMI_VARS, "mpich")
    if _in_srun_step(environ):
        return _from_slurm_vars(environ)
    return _Read(0, 0, 1, 1, "single", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")


# ----------------------------------------------------------------------------------------------
# Rendezvous address
# ----------------------------------------------------------------------------------------------


def _derived_master_addr(environ: Mapping[str, str]) -> tuple[str, str] | None:
    """First host of the SLURM node list or of $PBS_NODEFILE, as (host, where it came from)."""
    for var in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"):
        if environ.get(var, "").strip():
            return expand_nodelist(environ[var], var)[0], var
    nodefile = environ.get("PBS_NODEFILE", "").strip()
    if nodefile:
        path = Path(nodefile)
        if not path.is_file():
            raise FileNotFoundError(f"PBS_NODEFILE={nodefile} does not exist")
        for line in path.read_text().splitlines():
            if line.strip():
                return line.strip(), "PBS_NODEFILE"
        raise ValueError(f"PBS_NODEFILE={nodefile} lists no host")
    return None


def _master_addr(environ: Mapping[str, str], world: int, local_size: int, launcher: str) -> str:
    """MASTER_ADDR from the environment, else loopback for one node, else derived from the scheduler."""
    explicit = environ.get("MASTER_ADDR", "").strip()
    if explicit:
        return explicit
    if world == 1 or local_size == world:
        return LOOPBACK
    derived = _derived_master_addr(environ)
    if derived is None:
        raise ValueError(
            f"MASTER_ADDR is not set and cannot be derived for this {launcher} job of {world} ranks "
            f"({local_size if local_size > 0 else 'unknown'} on this node): export MASTER_ADDR=<host of rank 0> "
            "(with mpirun: -x MASTER_ADDR)"
        )
    return derived[0]


def _master_port(environ: Mapping[str, str]) -> int:
    """MASTER_PORT from the environment (validated), else DEFAULT_MASTER_PORT."""
    if not environ.get("MASTER_PORT", "").strip():
        return DEFAULT_MASTER_PORT
    port = _int_var(environ, "MASTER_PORT", minimum=1)
    if port > 65535:
        raise ValueError(f"environment variable MASTER_PORT={port} is not a TCP port (1-65535)")
    return port


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def detect_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Read this process's place in the job from the launcher's environment variables (os.environ default).

    Raises ValueError naming the variable when values are missing, malformed or inconsistent.
    """
    environ = os.environ if environ is None else environ
    r = _read_ranks(environ)
    local_size = r.local_size
    if local_size < 0:
        # No launcher told us the node-local size: only a one-node job can do without it.
        addr = environ.get("MASTER_ADDR", "").strip()
        if r.world > 1 and addr not in ("", LOOPBACK, "localhost"):
            raise ValueError(
                f"{r.local_size_var} is not set for a {r.launcher} job of {r.world_var}={r.world} "
                f"with MASTER_ADDR={addr}: cannot tell how many ranks share this node"
            )
        local_size = r.world
    if r.rank >= r.world:
        raise ValueError(f"{r.rank_var}={r.rank} is not below {r.world_var}={r.world}")
    if local_size > r.world:
        raise ValueError(f"{r.local_size_var}={local_size} exceeds {r.world_var}={r.world}")
    if r.local_rank >= local_size:
        raise ValueError(f"{r.local_rank_var}={r.local_rank} is not below {r.local_size_var}={local_size}")
    return DistEnv(
        rank=r.rank,
        local_rank=r.local_rank,
        world_size=r.world,
        local_world_size=local_size,
        master_addr=_master_addr(environ, r.world, local_size, r.launcher),
        master_port=_master_port(environ),
        launcher=r.launcher,
    )


def export_env(env: DistEnv) -> None:
    """Write `env` as the torch-style variables that torch.distributed ("env://") and DeepSpeed read."""
    os.environ.update(
        {
            "RANK": str(env.rank),
            "LOCAL_RANK": str(env.local_rank),
            "WORLD_SIZE": str(env.world_size),
            "LOCAL_WORLD_SIZE": str(env.local_world_size),
            "MASTER_ADDR": env.master_addr,
            "MASTER_PORT": str(env.master_port),
        }
    )


def find_free_port(host: str = LOOPBACK) -> int:
    """A TCP port that is free on `host` right now (the OS picks it; a race with other programs remains)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def device_for(env: DistEnv) -> torch.device:
    """The device this rank computes on: cuda:<local_rank> when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")


def _pick_backend(env: DistEnv, backend: str | None) -> str:
    """nccl on CUDA (binding this process to its GPU first), gloo elsewhere; an explicit choice wins."""
    cuda = torch.cuda.is_available()
    backend = backend or ("nccl" if cuda else "gloo")
    if backend == "nccl":
        if not cuda:
            raise ValueError("backend='nccl' needs CUDA, which is not available; use backend='gloo'")
        if env.local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK={env.local_rank} but only {torch.cuda.device_count()} GPUs are visible"
            )
        torch.cuda.set_device(env.local_rank)
    return backend


_TORCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# What init_distributed set up: the DistEnv it returned and the variables it overwrote (restored by
# destroy_distributed, so a later init in the same process detects the real launcher again).
_STATE: dict[str, DistEnv] = {}
_SAVED_VARS: dict[str, str | None] = {}


class RendezvousError(RuntimeError):
    """The ranks did not all meet within the start-up timeout (a rank missing, MASTER_ADDR unreachable)."""


def init_distributed(
    backend: str | None = None,
    timeout_minutes: float = 30,
    use_deepspeed: bool = True,
    init_timeout_minutes: float | None = None,
) -> DistEnv:
    """Detect the launcher, export RANK/WORLD_SIZE/..., and create the default process group.

    A single process also gets a 1-rank group (on a free port unless MASTER_PORT is set) so that code can
    call torch.distributed functions unconditionally. The rendezvous must complete within
    `init_timeout_minutes` (default: DEFAULT_INIT_TIMEOUT_MINUTES, at most `timeout_minutes`), else
    RendezvousError names MASTER_ADDR:MASTER_PORT, the world size and the timeout; collectives afterwards
    get `timeout_minutes`. With `use_deepspeed` DeepSpeed adopts the group (so that it knows about it),
    without JIT-building its CPU shared-memory op (see _skip_deepspeed_shm_op). A second call returns the
    same DistEnv without touching the group.
    """
    if dist.is_initialized() and "env" in _STATE:
        return _STATE["env"]
    env = detect_env()
    if env.launcher == "single" and not os.environ.get("MASTER_PORT", "").strip():
        env = replace(env, master_port=find_free_port())
    backend = _pick_backend(env, backend)
    _SAVED_VARS.update({name: os.environ.get(name) for name in _TORCH_VARS})
    export_env(env)
    timeout = timedelta(minutes=timeout_minutes)
    if init_timeout_minutes is None:
        init_timeout_minutes = min(DEFAULT_INIT_TIMEOUT_MINUTES, timeout_minutes)
    if not dist.is_initialized():  # else someone (e.g. deepspeed.initialize) made the group: adopt it
        _forget_deepspeed_groups()
        _create_group(env, backend, timedelta(minutes=init_timeout_minutes), timeout)
    if use_deepspeed:
        try:
            import deepspeed
        except ImportError as err:
            raise ImportError(
                "use_deepspeed=True but DeepSpeed is not installed "
                "(pip install --no-build-isolation deepspeed)"
            ) from err
        _skip_deepspeed_shm_op()
        deepspeed.init_distributed(
            dist_backend=backend,
            auto_mpi_discovery=False,
            timeout=timeout,
            verbose=False,
            dist_init_required=True,
        )
    _STATE["env"] = env
    if env.world_size > 1:
        _STATE["multi_rank"] = env
    return env


def _create_group(env: DistEnv, backend: str, init_timeout: timedelta, timeout: timedelta) -> None:
    """init_process_group("env://") with the rendezvous (store connection and the backend's connection of
    the ranks) bounded by `init_timeout` and explained while it waits; collectives then get `timeout`."""
    from torch.distributed import PrefixStore, rendezvous

    where = f"MASTER_ADDR:MASTER_PORT={env.master_addr}:{env.master_port}"
    limit = init_timeout.total_seconds()
    notice = (
        f"[moe-recipes] rank {env.rank}: still waiting for all {env.world_size} ranks to join at {where} "
        f"({{elapsed:.0f}} of {limit:g} s, distributed.init_timeout_minutes)"
    )
    kwargs = {"device_id": device_for(env)} if backend == "nccl" else {}
    if env.world_size == 1:
        # Nobody to meet: an in-process store, so no port is opened (and none can be taken by another job)
        dist.init_process_group(
            backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout, **kwargs
        )
        return
    quiet = env.local_rank != 0  # one notice per node
    with waiting_notice(notice, first_after_s=limit + 1 if quiet else min(30.0, limit / 4)):
        try:
            # What init_process_group("env://") does, with our own timeout for the rendezvous: rank 0 (or
            # torchrun's agent) serves a TCPStore that waits for all ranks; the others connect to it.
            store, _, _ = next(rendezvous("env://", timeout=init_timeout))
            dist.init_process_group(
                backend=backend,
                store=PrefixStore("default_pg", store),
                rank=env.rank,
                world_size=env.world_size,
                timeout=init_timeout,
                **kwargs,
            )
        except Exception as err:
            if dist.is_initialized():
                dist.destroy_process_group()
            first = (str(err).strip().splitlines() or [type(err).__name__])[0].rstrip(".")
            raise RendezvousError(
                f"rank {env.rank} of world size {env.world_size} ({env.launcher}) could not join the process "
                f"group at {where} within the start-up timeout of {limit:g} s "
                f"(distributed.init_timeout_minutes={limit / 60:g}): {type(err).__name__}: {first}. "
                f"Check that all {env.world_size} ranks were started, that MASTER_ADDR is the host of rank 0 "
                "and reachable from every node, and that MASTER_PORT is free there."
            ) from err
    store.set_timeout(timeout)
    set_pg_timeout = getattr(dist.distributed_c10d, "_set_pg_timeout", None)
    if set_pg_timeout is not None:
        set_pg_timeout(timeout)


def _skip_deepspeed_shm_op() -> None:
    """Keep DeepSpeed from JIT-building its CPU shared-memory op (`deepspeed_shm_comm`).

    DeepSpeed's TorchBackend builds it on first use of a CPU accelerator (deepspeed/comm/torch.py,
    build_shm_op) under $TORCH_EXTENSIONS_DIR, behind a `lock` file that an interrupted build leaves behind
    and that every later run then waits on for ever. The op serves only `inference_all_reduce` (AutoTP
    tensor parallelism); ZeRO training reduces with torch.distributed, so training loses nothing. This uses
    DeepSpeed's own fallback for platforms where the op is unsupported (its entry in the table of
    compatible ops); without a CPU accelerator the op is never built anyway.
    """
    import deepspeed.ops

    compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
    if isinstance(compatible, dict):
        compatible["deepspeed_shm_comm"] = False


def barrier() -> None:
    """Wait for every rank; a no-op when no process group exists."""
    if dist.is_initialized():
        dist.barrier()


def _forget_deepspeed_groups() -> None:
    """DeepSpeed caches process groups in module globals; after a group is destroyed (by anyone) they
    point at a dead group, and the next engine in this process would fail on them."""
    groups = sys.modules.get("deepspeed.utils.groups")
    release = getattr(groups, "_release_process_group_references", None)
    if release is not None:
        release(None)


def destroy_distributed() -> None:
    """Tear down the process group (and DeepSpeed's handle on it) and restore the exported variables."""
    if dist.is_initialized():
        dist.destroy_process_group()
    _STATE.pop("env", None)
    for name, value in _SAVED_VARS.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    _SAVED_VARS.clear()
    _forget_deepspeed_groups()
    ds_comm = sys.modules.get("deepspeed.comm.comm")
    if ds_comm is not None and getattr(ds_comm, "cdb", None) is not None:
        # DeepSpeed caches its backend object; left in place it would point at the destroyed group.
        ds_comm.cdb = None


def exit_process(code: int) -> int:
    """End a process that took part in a multi-rank job at once, after flushing its output; else return
    `code` for a normal exit.

    Once the work is done and the group destroyed, letting the interpreter tear down (DeepSpeed's and
    gloo's objects collected in whatever order) sometimes aborted a rank with "terminate called without an
    active exception" (SIGABRT) after the run had finished and saved, failing the whole job under torchrun
    and mpirun. Nothing is left to run at that point, so the process leaves without the teardown.
    """
    if "multi_rank" not in _STATE:
        return code
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
