"""Writing folders so that a crash never leaves one that looks complete."""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from pathlib import Path


def staging_dir(output: Path) -> Path:
    """A fresh temporary folder beside `output`, so the final rename stays on one file system."""
    output.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))


def publish(tmp_dir: Path, output: Path) -> None:
    """Move the finished folder into place; an old folder is removed only after the swap."""
    old: Path | None = None
    if output.exists():
        old = output.with_name(f".{output.name}.old-{os.getpid()}")
        output.rename(old)
    tmp_dir.rename(output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# errno values that mean "no room for this file": the device is full, a quota is spent, or the file would pass
# the process's RLIMIT_FSIZE (EFBIG; Python ignores SIGXFSZ, so the write fails instead of killing us).
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


# The same, from writers that do not raise OSError: torch.save's C++ stream ("basic_ios::clear: iostream
# error", "unexpected pos N vs M"), safetensors' Rust I/O ("File too large (os error 27)").
_NO_SPACE_TEXT = re.compile(
    r"No space left|File too large|Disk quota|os error (?:27|28|122)\b|iostream error|unexpected pos \d+ vs \d+"
)


def out_of_space_cause(err: BaseException) -> BaseException | None:
    """The out-of-space failure behind `err` (itself, a cause or context, or one rank's failure inside a
    torch.distributed.checkpoint CheckpointException), or None."""
    todo, seen = [err], set()
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if (isinstance(e, OSError) and e.errno in _NO_SPACE) or _NO_SPACE_TEXT.search(str(e)):
            return e
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            todo.extend(v[0] if isinstance(v, tuple) else v for v in failures.values() if v is not None)
        todo.extend(x for x in (e.__cause__, e.__context__) if x is not None)
    return None


def is_out_of_space(err: BaseException) -> bool:
    return out_of_space_cause(err) is not None


def out_of_space_error(err: BaseException, path: Path, needed: int | None) -> OSError:
    """An OSError that names what was being written, how much it needs and how much the device has."""
    try:
        free = shutil.disk_usage(path if path.exists() else path.parent).free
        have = f"{_gib(free)} free on its file system"
    except OSError:
        have = "free space unknown"
    need = f"about {_gib(needed)} needed" if needed else "size needed unknown"
    cause = out_of_space_cause(err) or err
    code = getattr(cause, "errno", None) or errno.ENOSPC
    why = getattr(cause, "strerror", None) or str(cause).strip().splitlines()[0]
    return OSError(code, f"out of space writing {path} ({need}, {have}): {why}", str(path))


def _gib(n: int) -> str:
    return f"{n / 2**30:.3f} GiB ({n:,} bytes)"


def folder_bytes(path: Path) -> int:
    """Total size of the files under `path` (0 if it is missing)."""
    if not path.is_dir():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class InUseError(RuntimeError):
    """Another run holds the lock on a file or folder that this run would write."""


class RunLock:
    """An exclusive `fcntl.flock` on `lock_path`, held until `release()` or the process ends (a `kill -9`
    frees it too). The holder writes its pid, host and start time into the file so that a refused second
    user is told who holds it. `what` names the guarded thing in that message."""

    def __init__(self, lock_path: Path, what: str):
        import fcntl
        import socket
        import time

        lock_path.parent.mkdir(parents=True, exist_ok=True)
        self.path = lock_path
        while True:
            self._file = open(self.path, "a+")  # noqa: SIM115 - held for the life of the lock
            try:
                fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._file.seek(0)
                holder = self._file.read().strip() or "a process that has not written its name yet"
                self._file.close()
                raise InUseError(
                    f"{what} is in use by another run ({holder}); wait for it to finish or "
                    f"point this run elsewhere (lock file {self.path})"
                ) from None
            if self._still_the_file():
                break
            self._file.close()  # the holder released (and removed) it between our open and our lock: again
        self._file.seek(0)
        self._file.truncate()
        self._file.write(
            f"pid {os.getpid()} on host {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
        )
        self._file.flush()

    def _still_the_file(self) -> bool:
        """Whether the path still names the file we locked (release() removes it, so a lock taken on the
        removed file would be a second holder)."""
        try:
            return os.stat(self.path).st_ino == os.fstat(self._file.fileno()).st_ino
        except FileNotFoundError:
            return False

    def release(self) -> None:
        """Remove the lock file and drop the lock (a refused user never waits, so removing it is safe)."""
        if not self._file.closed:
            self.path.unlink(missing_ok=True)
            self._file.close()  # closing drops the flock


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2 with RENAME_EXCHANGE): at every moment
    each name holds one of the two complete things. False where the system cannot, and nothing changed."""
    import ctypes
    import ctypes.util

    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    done = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return done == 0
