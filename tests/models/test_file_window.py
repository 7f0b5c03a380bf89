"""The sharded reader's memory maps (`sharded_load._Files`): dropped after every `window` bytes read, so the
touched file pages, which count as the process's memory while mapped, stay bounded by about the window."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from moe_recipes.models.sharded_load import _Files

MIB = 2**20


def _rss_file_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    pytest.skip("no RssFile in /proc/self/status")


@pytest.fixture
def weights(tmp_path) -> tuple[Path, dict[str, torch.Tensor]]:
    tensors = {f"t{i}": torch.randn(MIB) for i in range(16)}  # 16 x 4 MiB
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    return path, tensors


def _read_all(files: _Files, tensors: dict[str, torch.Tensor]) -> int:
    """Read every tensor through `files`, compare it, drop it; returns the growth of mapped file pages (KiB)."""
    before = _rss_file_kib()
    for name, want in tensors.items():
        assert torch.equal(files.read(name, (slice(None),)), want), name
    return _rss_file_kib() - before


def test_handles_are_dropped_every_window(weights):
    path, tensors = weights
    whole = _Files(dict.fromkeys(tensors, path), window=10**12)
    grown_whole = _read_all(whole, tensors)
    whole.close()
    windowed = _Files(dict.fromkeys(tensors, path), window=8 * MIB)
    grown_windowed = _read_all(windowed, tensors)
    assert grown_whole >= 48 * 1024, grown_whole  # every page stays mapped: about the 64 MiB read
    assert grown_windowed <= 16 * 1024, grown_windowed  # at most about the window (8 MiB) is
