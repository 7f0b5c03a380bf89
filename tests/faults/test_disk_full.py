"""Fault 2: the disk fills up while a checkpoint, a `prepare` output or a `convert` output is written.

Promise: an error naming the path and the space needed; earlier checkpoints and outputs intact; nothing
half-written that looks complete; old checkpoints are pruned only after a new one is complete.
The checkpoint case uses a small tmpfs (needs root and mount; skipped otherwise); prepare and convert run
in a subprocess under RLIMIT_FSIZE, where a write past the limit fails with EFBIG like a full disk.
"""

from __future__ import annotations

import filecmp
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from moe_recipes.train.trainer import train

from ..conftest import MIXTRAL_TOKENIZER
from ..train.utils import make_config
from .utils import check_save_dir, child_env, leftovers, run_settings


@pytest.fixture
def small_disk(tmp_path):
    """A 80 MiB tmpfs: room for one checkpoint of the tiny model (~50 MiB), not for two."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=80m", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "--lazy", str(mnt)], check=True)  # a failed write may hold a file open


def test_checkpoint_on_a_full_disk(tmp_path, small_disk, tiny_mixtral, tiny_dataset):
    save = small_disk / "ckpt"
    cfg = make_config(
        tmp_path, tiny_mixtral, tiny_dataset, *run_settings(save, "deepspeed", 3, "checkpoint.keep_last_n=1")
    )
    with pytest.raises(
        OSError, match=rf"out of space writing {save / 'iter_0000002.tmp'} \(about 0\.0\d\d GiB"
    ):
        train(cfg)
    # step 1's checkpoint is whole and still the latest: pruning waits for a complete new one
    assert check_save_dir(save) == 1 and leftovers(save) == []
    assert sorted(p.name for p in save.glob("iter_*")) == ["iter_0000001"]


def _limited(limit_bytes: int):
    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, resource.RLIM_INFINITY))

    return preexec


def _cli(*argv: str, limit: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "moe_recipes.cli", *argv],
        capture_output=True,
        text=True,
        env=child_env(),
        preexec_fn=_limited(limit),
        timeout=300,
    )


def test_prepare_on_a_full_disk_keeps_the_earlier_output(tmp_path, tiny_corpus, tiny_dataset):
    prefix = tmp_path / "en"
    earlier = f"{prefix}_text_document"
    for ext in (".bin", ".idx"):  # an earlier, complete output of this prefix
        shutil.copy(tiny_dataset + ext, earlier + ext)
    bigger = tmp_path / "bigger.jsonl"
    bigger.write_text(tiny_corpus.read_text() * 3)
    done = _cli(
        "prepare", "--input", str(bigger), "--tokenizer", str(MIXTRAL_TOKENIZER), "--output-prefix", str(prefix),
        "--append-eod", limit=40_000,
    )  # fmt: skip
    assert done.returncode != 0
    assert f"out of space writing {earlier}.bin (about " in done.stderr, done.stderr[-2000:]
    for ext in (".bin", ".idx"):
        assert filecmp.cmp(tiny_dataset + ext, earlier + ext, shallow=False)
    assert sorted(p.name for p in tmp_path.iterdir() if ".tmp" in p.name) == []


def test_convert_on_a_full_disk_keeps_the_earlier_output(tmp_path, tiny_mixtral, tiny_dataset):
    save = tmp_path / "ckpt"
    assert train(make_config(tmp_path, tiny_mixtral, tiny_dataset, *run_settings(save, "deepspeed", 1))) == 0
    out = tmp_path / "hf"
    shutil.copytree(tiny_mixtral, out)  # an earlier output, to be replaced with --overwrite
    done = _cli("convert", str(save), "--output", str(out), "--overwrite", limit=1_000_000)
    assert done.returncode != 0
    assert f"out of space writing {out} (about 0.0" in done.stderr, done.stderr[-2000:]
    assert filecmp.dircmp(tiny_mixtral, out).diff_files == [] and sorted(
        p.name for p in out.iterdir()
    ) == sorted(p.name for p in Path(tiny_mixtral).iterdir())
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".hf.tmp")] == []
