"""Run code in several real processes, for the tests of distributed code on CPU (gloo) and the benchmarks.

- `run_distributed(fn, world_size, *args)` starts `world_size` fresh Python processes with RANK/WORLD_SIZE/
  LOCAL_RANK/MASTER_ADDR/MASTER_PORT set and a process group initialised, calls `fn(*args, **kwargs)` in
  each and returns the results in rank order. A rank's exception is re-raised in the caller.
- `run_cli_distributed(argv, world_size, launcher)` runs `python -m moe_recipes.cli *argv` under a real
  launcher (torchrun, mpirun, the deepspeed launcher, srun), or as `world_size` processes started here with
  the variables a launcher sets ("direct": what a user's own script or a cluster's job controller does,
  without torchrun's agent process, about 1.5 s less per run on two cores); `run_module_distributed` does
  the same for any module.
- The cluster check that users run under their launcher is `moe_recipes.distributed.probe`, in the package;
  this harness is for the tests and benchmarks of this repository.

Children are separate interpreters (subprocess, not fork) so that each starts clean, as under a launcher;
they get OMP_NUM_THREADS=1 unless it is set, because several ranks share the CPU cores here.
"""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from moe_recipes.distributed.env import LOOPBACK, find_free_port

LAUNCH_LAUNCHERS = ("torchrun", "mpirun", "deepspeed", "srun")
DIRECT = "direct"  # run_module_distributed's own start: no launcher process, RANK/WORLD_SIZE/... set here
# Variables that describe *this* process's place in a job; a launched job must not inherit them (under
# mpirun an inherited RANK would win over OMPI_COMM_WORLD_RANK).
JOB_VARS = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "LOCAL_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "CROSS_RANK",
    "CROSS_SIZE",
    "GROUP_RANK",
    "ROLE_RANK",
    "TORCHELASTIC_RUN_ID",
)
_GRACE_S = 5.0  # after one rank fails, how long the others get to finish or fail before they are killed
_WORKER_CODE = "import sys; from tests.harness import _worker_main; sys.exit(_worker_main())"


class LaunchError(subprocess.CalledProcessError):
    """A launched job exited non-zero; str() includes the end of its output, unlike CalledProcessError."""

    def __str__(self) -> str:
        tail = "\n".join(
            f"--- {name} (last 4000 chars) ---\n{(text or '')[-4000:]}"
            for name, text in (("stdout", self.stdout), ("stderr", self.stderr))
        )
        return f"{super().__str__()}\n{tail}"


class DistributedRunError(RuntimeError):
    """A rank of run_distributed failed; the message holds that rank's traceback text."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now, for MASTER_PORT."""
    return find_free_port(LOOPBACK)


def _child_environ(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without job variables, with OMP_NUM_THREADS=1 by default and our
    sys.path on PYTHONPATH (so children import the same code, tests included)."""
    environ = {k: v for k, v in os.environ.items() if k not in JOB_VARS}
    environ.setdefault("OMP_NUM_THREADS", "1")
    paths = [p for p in sys.path if p] + environ.get("PYTHONPATH", "").split(os.pathsep)
    environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p for p in paths if p))
    environ.update(extra or {})
    return environ


def _descendants(pid: int) -> list[int]:
    """Pids of every process below `pid`, from /proc (empty where there is no /proc)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for children in Path(f"/proc/{parent}/task").glob("*/children"):
            try:
                kids = [int(c) for c in children.read_text().split()]
            except (OSError, ValueError):
                continue
            found.extend(kids)
            todo.extend(kids)
    return found


def kill_tree(proc: subprocess.Popen) -> None:
    """Kill a child started with start_new_session=True together with everything it started, including
    processes in sessions of their own (torchrun starts each worker in a new session, and a SIGKILLed
    torchrun cannot take them down; they would keep running and hold the output pipes open)."""
    for pid in [proc.pid, *_descendants(proc.pid)]:
        try:
            if os.getpgid(pid) == pid:  # a group leader: its group too
                os.killpg(pid, signal.SIGKILL)
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    proc.wait()


# ----------------------------------------------------------------------------------------------
# run_distributed
# ----------------------------------------------------------------------------------------------


def _pickle_payload(fn: Callable[..., Any], args: tuple, kwargs: dict) -> tuple[bytes, str]:
    """Pickle (fn, args, kwargs) for the ranks; a function of a script (__main__) is found by file path."""
    main_file = ""
    if getattr(fn, "__module__", None) == "__main__":
        main_file = getattr(sys.modules["__main__"], "__file__", None) or ""
        if not main_file:
            raise ValueError(
                f"fn={fn!r} is defined in an interactive session; define it in a module or script"
            )
    try:
        return pickle.dumps((fn, args, kwargs)), main_file
    except (pickle.PicklingError, AttributeError, TypeError) as err:
        raise ValueError(
            f"fn={fn!r} and its arguments must be picklable (a module-level function): {err}"
        ) from err


def _import_main(main_file: str) -> None:
    """Import the caller's script as __mp_main__ (so its `if __name__ == "__main__":` block stays off)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("__mp_main__", main_file)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"cannot import the calling script {main_file}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["__mp_main__"] = sys.modules["__main__"] = module
    spec.loader.exec_module(module)


def _write_record(path: Path, data: bytes) -> None:
    """Write a rank's pickled result atomically, so that the parent never reads half a file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _error_record(exc: BaseException) -> tuple[str, str, bytes | None]:
    """("error", traceback text, the pickled exception or None when it does not pickle)."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        exc_bytes: bytes | None = pickle.dumps(exc)
    except Exception:
        exc_bytes = None
    return "error", text, exc_bytes


def _worker_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of one rank: load the payload, join the group, run fn, write ("ok", value) or the error."""
    from moe_recipes.distributed.env import destroy_distributed, init_distributed

    payload_path, result_path, backend, main_file = list(argv if argv is not None else sys.argv[1:])
    result = Path(result_path)
    try:
        if main_file:
            _import_main(main_file)
        fn, args, kwargs = pickle.loads(Path(payload_path).read_bytes())
        init_distributed(backend=backend, use_deepspeed=False)
        value = fn(*args, **kwargs)
        try:
            record = pickle.dumps(("ok", value))
        except Exception as err:
            raise ValueError(f"the return value of {fn!r} is not picklable: {err}") from err
        destroy_distributed()
    except BaseException as exc:  # SystemExit and KeyboardInterrupt in fn are failures too
        _write_record(result, pickle.dumps(_error_record(exc)))
        return 1
    _write_record(result, record)
    return 0


def _wait_for_ranks(procs: list[subprocess.Popen], timeout: float, what: str) -> dict[int, int]:
    """Wait until every rank exits; once one fails, give the rest _GRACE_S, then kill them.

    Returns {rank: time.time_ns() when its non-zero exit was seen}. Raises TimeoutError naming the ranks
    still running `timeout` seconds after the start (they are killed).
    """
    deadline = time.monotonic() + timeout
    failed: dict[int, int] = {}
    first_failure = None
    while True:
        codes = [p.poll() for p in procs]
        for rank, code in enumerate(codes):
            if code not in (None, 0) and rank not in failed:
                failed[rank] = time.time_ns()
        now = time.monotonic()
        if failed and first_failure is None:
            first_failure = now
        if all(c is not None for c in codes) or (first_failure and now - first_failure > _GRACE_S):
            return failed
        if now > deadline:
            hung = [r for r, c in enumerate(codes) if c is None]
            for p in procs:
                kill_tree(p)
            raise TimeoutError(f"{what}: rank(s) {hung} still running after {timeout:g} s; killed them")
        time.sleep(0.05)


def _raise_rank_error(rank: int, world_size: int, record: tuple, what: str) -> None:
    """Re-raise a rank's exception in the caller: its own type when it unpickles, with the rank's
    traceback text as the cause; a DistributedRunError otherwise."""
    _, text, exc_bytes = record
    cause = DistributedRunError(f"{what}: rank {rank} of {world_size} raised:\n{text}")
    exc = None
    if exc_bytes is not None:
        try:
            exc = pickle.loads(exc_bytes)
        except Exception:
            exc = None
    if not isinstance(exc, Exception):
        raise cause
    if hasattr(exc, "add_note"):
        exc.add_note(f"(raised on rank {rank} of {world_size} in {what}; that rank's traceback is above)")
    raise exc from cause


def _collect(
    result_paths: list[Path], procs: list[subprocess.Popen], failed: dict[int, int], what: str
) -> list[Any]:
    """Read every rank's record; raise the failure that happened first (the others are often its echo,
    e.g. a peer's "connection closed")."""
    records = [pickle.loads(p.read_bytes()) if p.exists() else None for p in result_paths]
    world = len(procs)
    # When each rank failed: its error record's write time, else when its non-zero exit was seen.
    when = {
        r: result_paths[r].stat().st_mtime_ns for r, rec in enumerate(records) if rec and rec[0] == "error"
    }
    when.update({r: t for r, t in failed.items() if r not in when})
    if when:
        rank = min(when, key=lambda r: (when[r], r))
        others = sorted(set(when) - {rank})
        what_all = f"{what} (rank(s) {others} failed as well)" if others else what
        if records[rank] is not None and records[rank][0] == "error":
            _raise_rank_error(rank, world, records[rank], what_all)
        raise DistributedRunError(
            f"{what_all}: rank {rank} of {world} exited with code "
            f"{procs[rank].returncode} without reporting a result (see its output above)"
        )
    missing = [r for r, rec in enumerate(records) if rec is None]
    if missing:
        raise DistributedRunError(f"{what}: rank(s) {missing} exited without reporting a result")
    return [rec[1] for rec in records]


def _rank_vars(rank: int, world_size: int, port: int) -> dict[str, str]:
    """What a launcher tells rank `rank` of a one-node job of `world_size` ranks meeting at LOOPBACK:port."""
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
        "MASTER_ADDR": LOOPBACK,
        "MASTER_PORT": str(port),
    }


def _spawn_rank(
    rank: int, world_size: int, port: int, payload: Path, result: Path, backend: str, main_file: str
) -> subprocess.Popen:
    """Start one rank of run_distributed as `python -c <_worker_main>` in its own session (for killpg)."""
    environ = _child_environ(_rank_vars(rank, world_size, port))
    cmd = [sys.executable, "-c", _WORKER_CODE, str(payload), str(result), backend, main_file]
    return subprocess.Popen(cmd, env=environ, start_new_session=True)


def run_distributed(
    fn: Callable[..., Any],
    world_size: int = 2,
    *args: Any,
    backend: str = "gloo",
    timeout: float = 300,
    **kwargs: Any,
) -> list[Any]:
    """Run `fn(*args, **kwargs)` on `world_size` fresh processes joined in one process group.

    Each rank gets RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR=127.0.0.1 and a free
    MASTER_PORT, and `init_distributed(backend)` has run before `fn` is called. `fn` (and its arguments
    and return value) must pickle, so define it at module level. Returns the return values in rank order.
    A rank's exception is re-raised here (see _raise_rank_error); ranks still running `timeout` seconds
    after the start are killed and TimeoutError is raised.
    """
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be >= 1")
    what = f"run_distributed({getattr(fn, '__qualname__', fn)!s})"
    data, main_file = _pickle_payload(fn, args, kwargs)
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="run_distributed_") as tmp:
        payload = Path(tmp, "payload.pkl")
        payload.write_bytes(data)
        results = [Path(tmp, f"rank{r}.pkl") for r in range(world_size)]
        procs: list[subprocess.Popen] = []
        try:
            for rank in range(world_size):
                procs.append(_spawn_rank(rank, world_size, port, payload, results[rank], backend, main_file))
            failed = _wait_for_ranks(procs, timeout, what)
        finally:
            for p in procs:
                if p.poll() is None:
                    kill_tree(p)
        return _collect(results, procs, failed, what)


# ----------------------------------------------------------------------------------------------
# Real launchers
# ----------------------------------------------------------------------------------------------


def _require(program: str, launcher: str) -> str:
    """Full path of `program`, or FileNotFoundError saying which launcher needs it."""
    path = shutil.which(program)
    if path is None:
        raise FileNotFoundError(f"launcher={launcher!r} needs `{program}` on PATH, and it is not there")
    return path


def launch_command(
    launcher: str,
    module: str,
    argv: Sequence[str],
    world_size: int,
    master_port: int,
    export: Sequence[str] = (),
) -> list[str]:
    """The command line that starts `python -m module *argv` as `world_size` ranks on this node.

    launcher: "torchrun", "mpirun" (Open MPI; `export` names variables passed with -x), "deepspeed" (its
    launcher; --no_local_rank keeps `--local_rank=N` out of argv, LOCAL_RANK is in the environment) or
    "srun" (inside a SLURM allocation).
    """
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be >= 1")
    target = [sys.executable, "-m", module, *argv]
    if launcher == "torchrun":
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=1",
            f"--nproc_per_node={world_size}",
            f"--master_addr={LOOPBACK}",
            f"--master_port={master_port}",
            "-m",
            module,
            *argv,
        ]
    if launcher == "mpirun":
        exports = [arg for name in export for arg in ("-x", name)]
        # --bind-to none: Open MPI would pin each rank to one core, starving torch's threads.
        return [
            _require("mpirun", launcher),
            "--allow-run-as-root",
            "--oversubscribe",
            "--bind-to",
            "none",
            "-np",
            str(world_size),
            "-x",
            f"MASTER_PORT={master_port}",
            *exports,
            *target,
        ]
    if launcher == "deepspeed":
        return [
            sys.executable,
            "-m",
            "deepspeed.launcher.runner",
            f"--num_gpus={world_size}",
            f"--master_port={master_port}",
            "--no_local_rank",
            "--module",
            module,
            *argv,
        ]
    if launcher == "srun":
        return [_require("srun", launcher), f"--ntasks={world_size}", "--nodes=1", "--export=ALL", *target]
    raise ValueError(f"launcher={launcher!r} is not one of {', '.join(LAUNCH_LAUNCHERS)}")


def run_module_distributed(
    module: str,
    argv: Sequence[str],
    world_size: int = 2,
    launcher: str = "torchrun",
    timeout: float = 600,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `python -m module *argv` as `world_size` ranks under a real launcher and wait for it.

    launcher: one of LAUNCH_LAUNCHERS, or DIRECT (the ranks started here, see _run_module_direct).
    `env` adds variables (exported to MPI ranks too). Returns the completed process with stdout/stderr
    as text; raises LaunchError (a CalledProcessError that shows the output) on a non-zero exit and
    TimeoutError after killing the whole job when it runs past `timeout` seconds.
    """
    if launcher == DIRECT:
        return _run_module_direct(module, argv, world_size, timeout, env, cwd)
    environ = _child_environ(env)
    export = sorted({"OMP_NUM_THREADS", "PYTHONPATH", *(env or {})})
    cmd = launch_command(launcher, module, argv, world_size, free_port(), export)
    proc = subprocess.Popen(
        cmd,
        env=environ,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        out, err = proc.communicate()
        raise TimeoutError(
            f"{launcher} job still running after {timeout:g} s; killed it: {' '.join(cmd)}\n"
            f"--- stdout ---\n{out[-4000:]}\n--- stderr ---\n{err[-4000:]}"
        ) from None
    finally:
        if proc.poll() is None:  # interrupted while waiting
            kill_tree(proc)
    if proc.returncode != 0:
        raise LaunchError(proc.returncode, cmd, out, err)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _run_module_direct(
    module: str,
    argv: Sequence[str],
    world_size: int,
    timeout: float,
    env: Mapping[str, str] | None,
    cwd: str | os.PathLike[str] | None,
) -> subprocess.CompletedProcess[str]:
    """`python -m module *argv` as `world_size` processes with RANK, LOCAL_RANK, WORLD_SIZE,
    LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT set, as torchrun's agent would set them. Once a rank fails
    the others get _GRACE_S, then are killed (as the agent does). stdout and stderr are the ranks' outputs in
    rank order."""
    port = free_port()
    cmd = [sys.executable, "-m", module, *argv]
    what = f"{' '.join(cmd)} on {world_size} processes"
    with tempfile.TemporaryDirectory(prefix="run_direct_") as tmp:
        logs = [(Path(tmp, f"{rank}.out"), Path(tmp, f"{rank}.err")) for rank in range(world_size)]
        procs: list[subprocess.Popen] = []
        timed_out = None
        try:
            for rank, (out, err) in enumerate(logs):
                with open(out, "w") as stdout, open(err, "w") as stderr:  # the child keeps its own copies
                    procs.append(
                        subprocess.Popen(
                            cmd,
                            env=_child_environ({**(env or {}), **_rank_vars(rank, world_size, port)}),
                            cwd=cwd,
                            stdout=stdout,
                            stderr=stderr,
                            start_new_session=True,
                        )
                    )
            failed = _wait_for_ranks(procs, timeout, what)
        except TimeoutError as exc:
            timed_out = exc
        finally:
            for p in procs:
                if p.poll() is None:
                    kill_tree(p)
        stdout = "".join(out.read_text() for out, _ in logs)
        stderr = "".join(err.read_text() for _, err in logs)
    if timed_out is not None:
        raise TimeoutError(f"{timed_out}\n--- stdout ---\n{stdout[-4000:]}\n--- stderr ---\n{stderr[-4000:]}")
    if failed:  # the exit code of the rank that failed first (the others were killed after it)
        first = min(failed, key=lambda r: (failed[r], r))
        raise LaunchError(procs[first].returncode, cmd, stdout, stderr)
    return subprocess.CompletedProcess(cmd, 0, stdout, stderr)


def run_cli_distributed(
    argv: Sequence[str],
    world_size: int = 2,
    launcher: str = "torchrun",
    timeout: float = 600,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `moe-recipes *argv` (as `python -m moe_recipes.cli`) under a launcher; see run_module_distributed."""
    return run_module_distributed("moe_recipes.cli", argv, world_size, launcher, timeout, env, cwd)
