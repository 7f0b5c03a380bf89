"""Bounded waits at start-up: nothing before the first training step may block silently for ever.

Two kinds of wait can hold a job before it has printed anything:

- the rendezvous of the ranks (see `init_distributed`), bounded by `distributed.init_timeout_minutes`;
- the `lock` file of a C++ extension that PyTorch JIT-builds (`torch.utils.cpp_extension.load`, which
  DeepSpeed uses for its ops) under `$TORCH_EXTENSIONS_DIR` (default `~/.cache/torch_extensions`).
  The builder creates `<build dir>/lock` and deletes it when done; every other process polls until it is
  gone (`torch.utils.file_baton.FileBaton.wait`), with no time limit. A build that is killed leaves the
  lock behind, and every later run then waits on it for ever, printing nothing.

`bounded_extension_builds` replaces that wait, while it is active, by one that prints who holds the lock
(the builder keeps the lock file open for the whole build, so a process of this host that has it open is
a live build) and raises `ExtensionLockTimeout`, naming the lock and the fix, after a time limit. A lock
that no process on this host holds is reported as most likely stale, but it is not deleted: a build on
another node that shares the folder (a network home directory) looks the same from here.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

NOTICE_EVERY_S = 30.0  # how often a wait says that it is still waiting


class ExtensionLockTimeout(TimeoutError):
    """A JIT extension build lock was still there when the start-up time limit ran out."""


def lock_holders(path: str | os.PathLike[str]) -> list[int] | None:
    """Pids of the processes of this host that have `path` open (those whose /proc/PID/fd we may read).

    None where /proc cannot tell (not Linux).
    """
    proc = Path("/proc")
    if not (proc / "self" / "fd").is_dir():
        return None
    target = os.path.realpath(path)
    holders = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            for fd in (entry / "fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) == target:
                        holders.append(int(entry.name))
                        break
        except OSError:  # gone, or another user's process
            continue
    return holders


def describe_lock(path: str | os.PathLike[str]) -> str:
    """One sentence on a build lock: its age and whether a live process of this host holds it."""
    try:
        age = f"{time.time() - os.stat(path).st_mtime:.0f} s old"
    except OSError:
        age = "already gone"
    holders = lock_holders(path)
    if holders:
        return f"{path} ({age}) is held by a build running as pid {', '.join(map(str, holders))} on this host"
    if holders is None:
        return f"{path} ({age}): cannot tell from here whether a build holds it"
    return (
        f"{path} ({age}) is held by no process on this host: most likely it was left by an interrupted "
        f"build. Unless a build on another node shares this folder, delete it: rm {path}"
    )


def wait_for_lock(path: str, timeout_s: float, poll_s: float = 0.1, notice_every_s: float = NOTICE_EVERY_S):
    """Wait until `path` is gone, printing to stderr what holds it every `notice_every_s` seconds;
    raise ExtensionLockTimeout after `timeout_s`."""
    start = time.monotonic()
    next_notice = start + min(1.0, notice_every_s)  # a build that takes a second says nothing
    while os.path.exists(path):
        now = time.monotonic()
        if now - start > timeout_s:
            raise ExtensionLockTimeout(
                f"waited {timeout_s:g} s for the PyTorch extension build lock {describe_lock(path)}. "
                "(The lock is deleted by the build that made it; distributed.init_timeout_minutes sets "
                "this wait.)"
            )
        if now >= next_notice:
            print(
                f"[moe-recipes] waiting for another process to finish building a PyTorch extension "
                f"({now - start:.0f} of {timeout_s:g} s): lock {describe_lock(path)}",
                file=sys.stderr,
                flush=True,
            )
            next_notice = now + notice_every_s
        time.sleep(poll_s)


@contextlib.contextmanager
def bounded_extension_builds(timeout_s: float, notice_every_s: float = NOTICE_EVERY_S) -> Iterator[None]:
    """While active, a wait for another process's JIT extension build is bounded and explains itself.

    Patches `torch.utils.file_baton.FileBaton.wait`, the only place where `torch.utils.cpp_extension.load`
    waits. Not thread-safe with respect to other code patching the same method.
    """
    from torch.utils.file_baton import FileBaton

    original = FileBaton.wait

    def bounded_wait(self: FileBaton) -> None:
        wait_for_lock(self.lock_file_path, timeout_s, self.wait_seconds, notice_every_s)

    FileBaton.wait = bounded_wait  # type: ignore[method-assign]
    try:
        yield
    finally:
        FileBaton.wait = original  # type: ignore[method-assign]


@contextlib.contextmanager
def waiting_notice(message: str, first_after_s: float, every_s: float = NOTICE_EVERY_S) -> Iterator[None]:
    """Print `message` (formatted with `elapsed`, in seconds) to stderr after `first_after_s` seconds and
    then every `every_s` seconds, until the block ends: a blocking call that cannot report progress itself
    (a rendezvous) still tells the user what it waits for."""
    done = threading.Event()
    start = time.monotonic()

    def remind() -> None:
        delay = first_after_s
        while not done.wait(delay):
            print(message.format(elapsed=time.monotonic() - start), file=sys.stderr, flush=True)
            delay = every_s

    thread = threading.Thread(target=remind, name="moe-recipes-wait-notice", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
