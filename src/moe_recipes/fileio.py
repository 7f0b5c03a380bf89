"""Writing folders so that a crash never leaves one that looks complete."""

from __future__ import annotations

import os
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
