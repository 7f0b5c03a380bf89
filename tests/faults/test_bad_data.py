"""Fault 5: bad data stops the run at open time with file and line, or is skipped and counted on request."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moe_recipes.data.chat import build_index
from moe_recipes.data.indexed import token_dtype, write_index
from moe_recipes.train import trainer as trainer_mod
from moe_recipes.train.trainer import train

from ..train.utils import make_config

GOOD = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
BAD_LINES = {
    "unknown role": (
        {"messages": [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        r"messages\[0\]: unknown role 'human'",
    ),
    "non-string content": (
        {"messages": [{"role": "user", "content": ["hi"]}, {"role": "assistant", "content": "hello"}]},
        r"messages\[0\]: content of the user message must be a string",
    ),
    "empty assistant turn": (
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},
        r"messages\[1\]: the assistant message is empty",
    ),
    "no assistant turn": (
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]},
        "no assistant message to train on",
    ),
    "invalid UTF-8": (b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', "not valid JSON"),
}


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the bad data was not caught before the model load")

    monkeypatch.setattr(trainer_mod, "load_model", refuse)


def _write_chat(path: Path, bad: dict | bytes) -> None:
    good = (json.dumps(GOOD) + "\n").encode()
    bad_line = bad if isinstance(bad, bytes) else json.dumps(bad).encode()
    path.write_bytes(good * 2 + bad_line + b"\n" + good)


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_bad_chat_line_names_file_and_line(tmp_path, tiny_mixtral, no_model_load, case):
    bad, message = BAD_LINES[case]
    path = tmp_path / "chat.jsonl"
    _write_chat(path, bad)
    cfg = make_config(
        tmp_path, tiny_mixtral, str(path), "data.format=chat", "data.split=100,0,0", "train.epochs=1"
    )
    with pytest.raises(ValueError, match=rf"{path}:3: .*{message}"):
        train(cfg)
    info = build_index(path, skip_bad_lines=True)  # data.skip_bad_lines / --skip-bad-lines: skipped, counted
    assert (info.conversations, info.bad_lines) == (3, 1) and f"{path}:3" in info.first_error


def test_token_ids_beyond_the_vocabulary(tmp_path, tiny_mixtral, no_model_load):
    """A dataset tokenized with a larger vocabulary: refused before training, naming the .bin and the id."""
    prefix = tmp_path / "big_vocab"
    tokens = np.arange(0, 5_000, dtype=np.int64) * 6 % 32_000
    tokens[3_333] = 32_000  # one stray id; the tiny Mixtral has 32000: 0 ... 31999
    dtype = token_dtype(64_000)
    Path(f"{prefix}.bin").write_bytes(tokens.astype(dtype).tobytes())
    write_index(f"{prefix}.idx", dtype, np.array([len(tokens) // 2, len(tokens) - len(tokens) // 2]))
    with pytest.raises(
        ValueError, match=rf"{prefix}\.bin holds token id 32000, but the model's vocabulary has 32000"
    ):
        train(make_config(tmp_path, tiny_mixtral, str(prefix)))
