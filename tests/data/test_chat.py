"""Chat data: line formats, the offset index, and assistant-only labels on the real tokenizers' templates."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from moe_recipes.data.chat import (
    IGNORE_INDEX,
    ChatFile,
    build_index,
    chat_sample,
    conversation_lengths,
    pad_token_id,
    parse_conversation,
    tokenize_chat,
)

from ..assets import DEEPSEEK_TOKENIZER, MIXTRAL_TOKENIZER

TOKENIZERS = {"mixtral": MIXTRAL_TOKENIZER, "deepseek": DEEPSEEK_TOKENIZER}

CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "How do I list files?"},
    {"role": "assistant", "content": "Run ls -l in the folder.\nIt shows sizes too."},
    {"role": "user", "content": "日本語でも?"},
    {"role": "assistant", "content": "はい、ls は同じです。"},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You are welcome."},
]


@pytest.fixture(scope="module", params=["mixtral", "deepseek"])
def tokenizer(request):
    return AutoTokenizer.from_pretrained(TOKENIZERS[request.param])


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return list(zip(edges[::2], edges[1::2]))


def test_trained_spans_are_exactly_the_assistant_turns(tokenizer):
    chat = tokenize_chat(tokenizer, CONVERSATION, max_tokens=10_000)
    assert not chat.truncated
    answers = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    runs = _runs(chat.trained)
    assert len(runs) == len(answers)
    for (lo, hi), answer in zip(runs, answers):
        assert tokenizer.decode(chat.tokens[lo:hi].tolist()) == answer + tokenizer.eos_token
    # everything else (BOS, system, user turns, the template's markers) is untrained
    assert tokenizer.decode(chat.tokens[~chat.trained].tolist()).count("How do I list files?") == 1


def test_sample_labels_are_shifted_targets(tokenizer):
    chat = tokenize_chat(tokenizer, CONVERSATION, max_tokens=10_000)
    sample = chat_sample(chat)
    n = len(chat.tokens) - 1
    assert len(sample["input_ids"]) == len(sample["labels"]) == n
    np.testing.assert_array_equal(sample["input_ids"], chat.tokens[:-1])
    trained = sample["labels"] != IGNORE_INDEX
    np.testing.assert_array_equal(trained, chat.trained[1:])
    np.testing.assert_array_equal(sample["labels"][trained], chat.tokens[1:][trained])
    assert sample["labels"][-1] == tokenizer.eos_token_id  # the conversation's last target: end of turn


def test_template_with_generation_markers_and_trimmed_content():
    """A ChatML-style template (header + <|im_end|> trailer, content trimmed): header untrained, trailer
    trained, the content found even though the template changes it."""
    tok = AutoTokenizer.from_pretrained(DEEPSEEK_TOKENIZER)
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  Hello there. "}]
    chat = tokenize_chat(tok, messages, max_tokens=10_000)
    ((lo, hi),) = _runs(chat.trained)
    assert tok.decode(chat.tokens[lo:hi].tolist()) == "Hello there.<|im_end|>\n"
    assert tok.decode(chat.tokens[:lo].tolist()).endswith("<|im_start|>assistant\n")


def test_truncation_keeps_the_limit_and_reports(tokenizer):
    chat = tokenize_chat(tokenizer, CONVERSATION, max_tokens=12)
    assert chat.truncated and len(chat.tokens) == len(chat.trained) == 12
    full = tokenize_chat(tokenizer, CONVERSATION, max_tokens=10_000)
    np.testing.assert_array_equal(chat.tokens, full.tokens[:12])


def test_pad_token_falls_back_to_eos():
    mixtral = AutoTokenizer.from_pretrained(MIXTRAL_TOKENIZER)
    deepseek = AutoTokenizer.from_pretrained(DEEPSEEK_TOKENIZER)
    assert mixtral.pad_token_id is None and pad_token_id(mixtral) == mixtral.eos_token_id
    assert pad_token_id(deepseek) == deepseek.pad_token_id != deepseek.eos_token_id


def test_both_line_formats():
    io = {"input": [{"role": "user", "content": "q"}], "output": {"role": "assistant", "content": "a"}}
    assert parse_conversation(io, "x") == [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a"},
    ]
    assert parse_conversation({"messages": CONVERSATION}, "x") == CONVERSATION
    with pytest.raises(ValueError, match="f.jsonl:3: no assistant message"):
        parse_conversation({"messages": [{"role": "user", "content": "q"}]}, "f.jsonl:3")
    with pytest.raises(ValueError, match="output role must be 'assistant'"):
        parse_conversation({"input": [], "output": {"role": "user", "content": "a"}}, "x")


def _write(path: Path, records: list) -> None:
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in records)
    )


def test_index_reads_by_seeking_and_rebuilds_when_the_file_changes(tmp_path):
    records = [
        {"messages": [{"role": "user", "content": f"q{i} é"}, {"role": "assistant", "content": f"a{i}"}]}
        for i in range(5)
    ]
    path = tmp_path / "chat.jsonl"
    _write(path, records[:3] + [""] + records[3:])  # a blank line is ignored
    info = build_index(path)
    assert info.rebuilt and info.conversations == 5
    assert (tmp_path / ".index_cache" / "chat.jsonl.index.npy").is_file()
    assert not build_index(path).rebuilt
    chats = ChatFile(path)
    assert [chats[i][1]["content"] for i in range(5)] == [f"a{i}" for i in range(5)]
    assert chats.line_number(3) == 5
    with open(path, "a") as f:
        f.write(json.dumps(records[0]) + "\n")
    assert build_index(path).rebuilt and len(ChatFile(path)) == 6


def test_bad_lines_error_with_line_number_or_are_skipped(tmp_path):
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    path = tmp_path / "bad.jsonl"
    _write(path, [good, "{not json", good, {"messages": [{"role": "user", "content": 3}]}])
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        build_index(path)
    info = build_index(path, skip_bad_lines=True)
    assert (info.conversations, info.bad_lines) == (2, 2)
    assert "bad.jsonl:2" in info.first_error
    # an index with skipped lines is not silently used by a caller that does not skip
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        ChatFile(path)


def test_conversation_lengths_match_tokenization_and_are_cached(tmp_path, tokenizer):
    path = tmp_path / "c.jsonl"
    _write(path, [{"messages": CONVERSATION}, {"messages": CONVERSATION[1:3]}])
    chats = ChatFile(path)
    lengths = conversation_lengths(chats, tokenizer)
    expected = [len(tokenize_chat(tokenizer, chats[i], 10_000).tokens) for i in range(2)]
    assert lengths.tolist() == expected
    assert len(list((tmp_path / ".index_cache").glob("c.jsonl.lengths-*.npy"))) == 1


def test_arrow_stream_chat_file_reads_the_jsonl_conversations(tmp_path):
    """A `datasets`-style data-*.arrow (IPC stream, several record batches): same conversations as JSONL."""
    import pyarrow as pa

    demo = tmp_path / "howto.jsonl"  # a copy: the index is written beside the file
    demo.write_bytes((Path(__file__).resolve().parents[2] / "demo" / "chat" / "howto.jsonl").read_bytes())
    records = [json.loads(line) for line in demo.read_text().splitlines()]
    table = pa.Table.from_pylist(records)
    path = tmp_path / "data-00000-of-00001.arrow"
    with pa.ipc.new_stream(path, table.schema) as writer:
        writer.write_table(table, max_chunksize=3)
    jsonl, arrow = ChatFile(demo), ChatFile(path)
    assert len(arrow) == len(jsonl) == len(records)
    assert [arrow[i] for i in reversed(range(len(arrow)))] == [jsonl[i] for i in reversed(range(len(jsonl)))]
    assert arrow.rows[:, 0].max() == (len(records) - 1) // 3  # (record batch, row in it, row number)
    assert arrow.line_number(4) == 5
