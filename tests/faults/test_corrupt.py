"""Fault 4: damaged files are refused when they are opened, with the file and what is wrong named.

Each test breaks one file of a good copy and starts `train` (or the reader) on it; the error must come from
the cheap checks, before a model is loaded or a sample is read.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from moe_recipes.convert.sources import inspect_checkpoint
from moe_recipes.data.chat import ChatFile, build_index, index_paths
from moe_recipes.data.indexed import IndexedDataset
from moe_recipes.train import trainer as trainer_mod
from moe_recipes.train.trainer import train

from ..train.utils import make_config


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_mixtral, tiny_dataset) -> Path:
    """SAVE folder of a 2-step ZeRO-1 run (model states and a separate optimizer partition)."""
    d = tmp_path_factory.mktemp("saved")
    cfg = make_config(
        d,
        tiny_mixtral,
        tiny_dataset,
        "train.iters=2",
        "eval.iters=0",
        "distributed.zero_stage=1",
        f"checkpoint.save={d / 'ckpt'}",
    )
    assert train(cfg) == 0
    return d / "ckpt"


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if training gets as far as loading the model."""

    def refuse(*args, **kwargs):
        raise AssertionError("the damaged file was not caught before the model load")

    monkeypatch.setattr(trainer_mod, "load_model", refuse)


def _copy_dataset(prefix: str, tmp_path: Path) -> str:
    out = tmp_path / "copy"
    for ext in (".bin", ".idx"):
        shutil.copy(prefix + ext, str(out) + ext)
    return str(out)


def _cut_in_half(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def test_bin_shorter_than_its_index(tmp_path, tiny_mixtral, tiny_dataset, no_model_load):
    prefix = _copy_dataset(tiny_dataset, tmp_path)
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(os.path.getsize(prefix + ".bin") - 2)
    with pytest.raises(ValueError, match=rf"{prefix}\.bin: size \d+ does not match its index"):
        train(make_config(tmp_path, tiny_mixtral, prefix))


@pytest.mark.parametrize(
    ("offset", "data", "message"),
    [(0, b"NOTMMIDX\x00", "not an MMIDIDX index"), (9, struct.pack("<Q", 7), "unsupported index version 7")],
)
def test_index_with_wrong_magic_or_version(
    tmp_path, tiny_mixtral, tiny_dataset, no_model_load, offset, data, message
):
    prefix = _copy_dataset(tiny_dataset, tmp_path)
    with open(prefix + ".idx", "r+b") as f:
        f.seek(offset)
        f.write(data)
    with pytest.raises(ValueError, match=rf"{prefix}\.idx: {message}"):
        train(make_config(tmp_path, tiny_mixtral, prefix))
    with pytest.raises(ValueError, match=message):  # and the reader alone
        IndexedDataset(prefix)


@pytest.mark.parametrize(
    "victim", ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
)
def test_checkpoint_file_cut_in_half(tmp_path, saved, tiny_mixtral, tiny_dataset, no_model_load, victim):
    save = Path(shutil.copytree(saved, tmp_path / "ckpt"))
    damaged = save / "iter_0000002" / victim
    size = damaged.stat().st_size
    _cut_in_half(damaged)
    expected = rf"{damaged} is {size // 2} bytes, but was written with {size} bytes"
    cfg = make_config(
        tmp_path, tiny_mixtral, tiny_dataset, f"checkpoint.save={save}", f"checkpoint.load={save}"
    )
    with pytest.raises(ValueError, match=expected):
        train(cfg)
    with pytest.raises(ValueError, match=expected):  # convert opens it the same way
        inspect_checkpoint(save)


def test_latest_naming_a_missing_folder(tmp_path, saved, tiny_mixtral, tiny_dataset, no_model_load):
    save = Path(shutil.copytree(saved, tmp_path / "ckpt"))
    (save / "latest").write_text("iter_0000009\n")
    cfg = make_config(
        tmp_path, tiny_mixtral, tiny_dataset, f"checkpoint.save={save}", f"checkpoint.load={save}"
    )
    with pytest.raises(
        FileNotFoundError, match=rf"{save / 'latest'} names 'iter_0000009', which does not exist"
    ):
        train(cfg)


def _chat_lines(answers: list[str]) -> str:
    return "".join(
        json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": a}]})
        + "\n"
        for a in answers
    )


def test_chat_index_older_than_its_jsonl_is_rebuilt(tmp_path):
    """An index of an earlier version of the file is never used: the file's size and mtime are part of it."""
    path = tmp_path / "chat.jsonl"
    path.write_text(_chat_lines(["one", "two"]))
    assert build_index(path).rebuilt
    before = path.stat().st_mtime_ns
    path.write_text(_chat_lines(["uno", "dos"]))  # same size, newer
    os.utime(path, ns=(before + 1_000_000, before + 1_000_000))
    chats = ChatFile(path)
    assert chats.info.rebuilt and [chats[i][1]["content"] for i in range(len(chats))] == ["uno", "dos"]


def test_damaged_chat_index_is_rebuilt_with_a_message(tmp_path, capsys):
    path = tmp_path / "chat.jsonl"
    path.write_text(_chat_lines(["one", "two", "three"]))
    build_index(path)
    index_file, _ = index_paths(path)
    _cut_in_half(index_file)
    chats = ChatFile(path)
    assert f"rebuilding the damaged index {index_file}" in capsys.readouterr().err
    assert chats.info.rebuilt and len(chats) == 3 and chats[2][1]["content"] == "three"
    assert np.load(index_file).shape == (3, 3)
