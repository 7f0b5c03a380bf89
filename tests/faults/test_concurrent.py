"""Fault 6: two processes on the same files. Two `prepare` runs of one prefix, two runs sharing a
data.cache_dir (the sample index is built once, read by both), two runs saving to one checkpoint.save
(the second refuses, naming the holder)."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from moe_recipes.data.indexed import IndexedDataset
from moe_recipes.train.trainer import train

from ..conftest import MIXTRAL_TOKENIZER
from ..train.utils import make_config
from .utils import check_save_dir, child_env, run_settings

HOLD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from moe_recipes.fileio import RunLock
    lock = RunLock(Path(sys.argv[1]), "test")
    print("held", flush=True)
    time.sleep(600)
    """
)


def _holder(lock_path) -> subprocess.Popen:
    """Another process holding the lock that a run of this save folder / prefix takes."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(lock_path)], stdout=subprocess.PIPE, text=True, env=child_env()
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_run_on_one_checkpoint_save_refuses(tmp_path, tiny_mixtral, tiny_dataset):
    save = tmp_path / "ckpt"
    cfg = make_config(tmp_path, tiny_mixtral, tiny_dataset, *run_settings(save, "deepspeed", 1))
    holder = _holder(save / ".lock")
    try:
        holder_id = rf"pid {holder.pid} on host {socket.gethostname()}"
        with pytest.raises(
            RuntimeError, match=rf"checkpoint.save {save} is in use by another run \({holder_id}"
        ):
            train(cfg)
        assert not list(save.glob("iter_*"))
    finally:
        holder.kill()  # kill -9: the lock goes with the process
        holder.wait()
    assert train(make_config(tmp_path, tiny_mixtral, tiny_dataset, *run_settings(save, "deepspeed", 1))) == 0
    assert check_save_dir(save) == 1


def _prepare(corpus, prefix) -> subprocess.Popen:
    argv = [
        "prepare",
        "--input",
        str(corpus),
        "--tokenizer",
        str(MIXTRAL_TOKENIZER),
        "--output-prefix",
        str(prefix),
    ]
    return subprocess.Popen(
        [sys.executable, "-m", "moe_recipes.cli", *argv, "--append-eod"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
    )


def test_two_prepares_of_one_prefix(tmp_path, tiny_corpus, tiny_dataset):
    """Started together: each either finishes or refuses naming the other; the result is one whole output."""
    prefix = tmp_path / "en"
    other = tmp_path / "other.jsonl"
    other.write_text("".join(tiny_corpus.read_text().splitlines(keepends=True)[:40]))
    procs = [_prepare(tiny_corpus, prefix), _prepare(other, prefix)]
    results = [(p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in procs]
    # refused naming the other: its pid, or, when it asked in the instant between the other's lock and the
    # other writing its name into the lock file, that it has not written it yet
    refusals = ("(pid", "(a process that has not written its name yet)")
    for code, _, err in results:
        refused = any(
            f"output prefix {prefix}_text_document is in use by another run {r}" in err for r in refusals
        )
        assert code == 0 or refused, err[-2000:]
    assert any(code == 0 for code, _, _ in results)
    ds = IndexedDataset(f"{prefix}_text_document")  # .bin and .idx of one run, not one of each
    full = IndexedDataset(tiny_dataset)
    assert len(ds) in (40, len(full)) and np.array_equal(ds[len(ds) - 1], full[len(ds) - 1])
    # and the refused one did not stop the later one: run alone, it succeeds
    alone = _prepare(other, prefix)
    assert alone.wait(timeout=300) == 0, alone.stderr.read()[-2000:]
    assert len(IndexedDataset(f"{prefix}_text_document")) == 40


BUILD = textwrap.dedent(
    """
    import sys
    from moe_recipes.config import load_config
    from moe_recipes.data.factory import build_training_data
    data = build_training_data(load_config(sys.argv[1], []))
    print("samples", [int(data.train[i]["tokens"].sum()) for i in range(len(data.train))])
    """
)


def test_two_runs_share_one_cache_dir(tmp_path, tiny_mixtral, tiny_dataset):
    """Two processes start at once on one data.cache_dir: each index is built by one and read by the other."""
    from ..train.utils import write_config

    config = write_config(tmp_path, tiny_mixtral, tiny_dataset, "train.iters=50")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", BUILD, str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=child_env(),
        )
        for _ in range(2)
    ]
    outs = [(p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in procs]
    assert all(code == 0 for code, _, _ in outs), outs
    logs = "".join(err for _, _, err in outs)
    for split in ("train", "valid"):
        assert logs.count(f"building sample index for {split} split") == 1, logs
        assert logs.count(f"reusing sample index for {split} split") == 1, logs
    assert outs[0][1] == outs[1][1] and outs[0][1].startswith("samples [")
    assert len(list((tmp_path / "cache").glob("*.lock"))) == 2


def test_a_lock_released_between_open_and_lock_is_taken_again_on_the_new_file(tmp_path, monkeypatch):
    """release() removes the lock file. A run that opened the old file just before, and locks it just
    after, must not hold a lock on the removed file while a third run locks a new one: it locks again."""
    import fcntl

    from moe_recipes.fileio import InUseError, RunLock

    path = tmp_path / ".lock"
    first = RunLock(path, "test")
    real_flock, calls = fcntl.flock, []

    def release_first_then_lock(f, op):
        if not calls:  # the second run has opened the file; the first one lets go right now
            first.release()
        calls.append(op)
        return real_flock(f, op)

    monkeypatch.setattr(fcntl, "flock", release_first_then_lock)
    second = RunLock(path, "test")
    monkeypatch.undo()
    assert len(calls) == 2  # the lock on the removed file was dropped and taken again on the new one
    with pytest.raises(InUseError, match="in use by another run"):
        RunLock(path, "test")  # a third run sees the second one's lock
    second.release()
