"""Chat (instruction-tuning) data: JSONL formats, the offset index, rendering and assistant-only labels.

Two line formats are read, one JSON object per line:

* `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}` (multi-turn, optional system),
* `{"input": [{"role": ..., "content": ...}, ...], "output": {"role": "assistant", "content": ...}}`.

The same records may come as Parquet or Arrow rows (a `messages` column, or `input` and `output` columns;
see `data.chat_tables`), detected from the file's first bytes; a row behaves exactly like the same record
as a JSON line, and errors name the file and row instead of the line.

A file is opened through an offset index (`.index_cache/NAME.index.npy` + `NAME.meta.json` beside it): byte
ranges and line numbers of the valid lines, built once and memory-mapped, so a file of millions of lines
opens at once and each conversation is read with one `pread`. For Parquet/Arrow files the index holds the
row group (record batch), the row within it and the row number instead. The index is rebuilt when the file's size or
modification time changes.

Conversations are rendered with the tokenizer's own chat template. The trained spans (labels != -100) are
the assistant contents plus whatever the template appends after them (the end-of-turn token, e.g. EOS);
they are found for any template, with or without generation markers, by rendering the conversation
incrementally and locating each assistant turn's content in the text it adds.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moe_recipes.data.chat_tables import TableRows, is_columnar

IGNORE_INDEX = -100
INDEX_VERSION = 2  # 2: roles and empty assistant turns are checked
CACHE_DIR_NAME = ".index_cache"
# Stands in for an assistant's content to learn what the template writes around it.
_SENTINEL = "\u2063MOE_RECIPES_CONTENT\u2063"

Message = dict[str, str]
# Roles the chat templates of HF models know; anything else (ShareGPT's "human"/"gpt", a typo) is refused
# rather than rendered into something the model was never shown.
ROLES = ("system", "user", "assistant", "tool")


# ----------------------------------------------------------------------------------------------------------
# Line formats
# ----------------------------------------------------------------------------------------------------------


def _message(obj: Any, where: str, default_role: str | None = None) -> Message:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: a message must be an object with role and content, got {obj!r:.80}")
    role = obj.get("role", default_role)
    content = obj.get("content")
    if not isinstance(role, str) or not role:
        raise ValueError(f"{where}: message role must be a non-empty string, got {role!r}")
    if role not in ROLES:
        raise ValueError(f"{where}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
    if not isinstance(content, str):
        raise ValueError(f"{where}: content of the {role} message must be a string, got {content!r:.80}")
    if role == "assistant" and not content.strip():
        raise ValueError(f"{where}: the assistant message is empty (nothing to train on)")
    return {"role": role, "content": content}


def parse_conversation(obj: Any, where: str) -> list[Message]:
    """One JSONL record (either format) -> its list of messages; ValueError naming `where` if malformed."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        raw = obj["messages"]
        if not isinstance(raw, list) or not raw:
            raise ValueError(f"{where}: 'messages' must be a non-empty list")
        messages = [_message(m, f"{where}: messages[{i}]") for i, m in enumerate(raw)]
    elif "input" in obj and "output" in obj:
        raw = obj["input"]
        if not isinstance(raw, list):
            raise ValueError(f"{where}: 'input' must be a list of messages")
        messages = [_message(m, f"{where}: input[{i}]") for i, m in enumerate(raw)]
        messages.append(_message(obj["output"], f"{where}: output", default_role="assistant"))
        if messages[-1]["role"] != "assistant":
            raise ValueError(f"{where}: output role must be 'assistant', got {messages[-1]['role']!r}")
    else:
        raise ValueError(
            f"{where}: expected a 'messages' list or 'input' and 'output' keys, got {sorted(obj)}"
        )
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: no assistant message to train on")
    return messages


# ----------------------------------------------------------------------------------------------------------
# Offset index
# ----------------------------------------------------------------------------------------------------------


@dataclass
class IndexInfo:
    """What an index holds: valid lines, and the skipped invalid ones (count and the first one's error)."""

    path: Path
    conversations: int
    bad_lines: int
    first_error: str | None
    rebuilt: bool


def index_paths(path: str | Path) -> tuple[Path, Path]:
    """(`.index_cache/NAME.index.npy`, `.index_cache/NAME.meta.json`) beside the JSONL file."""
    p = Path(path)
    folder = p.parent / CACHE_DIR_NAME
    return folder / f"{p.name}.index.npy", folder / f"{p.name}.meta.json"


def _signature(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "version": INDEX_VERSION}


def _skip_or_raise(err: ValueError, skip_bad_lines: bool) -> None:
    if not skip_bad_lines:
        raise ValueError(f"{err} (use --skip-bad-lines / data.skip_bad_lines to skip)") from None


def _scan_table(path: Path, skip_bad_lines: bool) -> tuple[np.ndarray, int, str | None]:
    """Parquet/Arrow: int64 (n, 3) rows [unit (row group or batch), row in unit, 1-based row] of valid rows."""
    rows: list[tuple[int, int, int]] = []
    bad, first_error = 0, None
    for number, (unit, offset, record) in enumerate(TableRows(path).rows(), start=1):
        try:
            parse_conversation(record, f"{path}, row {number}")
        except ValueError as err:
            _skip_or_raise(err, skip_bad_lines)
            bad += 1
            first_error = first_error or str(err)
            continue
        rows.append((unit, offset, number))
    return np.array(rows, dtype=np.int64).reshape(-1, 3), bad, first_error


def _scan(path: Path, skip_bad_lines: bool) -> tuple[np.ndarray, int, str | None]:
    """Byte ranges and line numbers of the valid lines: int64 (n, 3) rows [start, end, line]."""
    if is_columnar(path):
        return _scan_table(path, skip_bad_lines)
    rows: list[tuple[int, int, int]] = []
    bad, first_error, offset = 0, None, 0
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            start, offset = offset, offset + len(line)
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                parse_conversation(json.loads(line), where)
            except (ValueError, UnicodeDecodeError) as err:
                if isinstance(err, json.JSONDecodeError) or isinstance(err, UnicodeDecodeError):
                    err = ValueError(f"{where}: not valid JSON ({err})")
                _skip_or_raise(err, skip_bad_lines)
                bad += 1
                first_error = first_error or str(err)
                continue
            rows.append((start, offset, lineno))
    return np.array(rows, dtype=np.int64).reshape(-1, 3), bad, first_error


def _write_atomic(path: Path, write: Any) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array)


def _read_meta(meta_file: Path, index_file: Path) -> dict[str, Any] | None:
    """The index's metadata if it and the index file are whole (same row count), else None (rebuild)."""
    try:
        meta = json.loads(meta_file.read_text())
        rows = np.load(index_file, mmap_mode="r")
        if rows.shape != (meta["conversations"], 3):
            raise ValueError(f"{len(rows)} rows, metadata says {meta['conversations']}")
        return meta
    except (OSError, ValueError, KeyError, TypeError) as err:
        print(f"[moe-recipes] rebuilding the damaged index {index_file} ({err})", file=sys.stderr, flush=True)
        return None


def build_index(path: str | Path, skip_bad_lines: bool = False, force: bool = False) -> IndexInfo:
    """Write (or reuse) the offset index of one JSONL file.

    Reused when its recorded size, modification time and format version match the file's. Invalid lines
    raise ValueError naming the file and line, unless `skip_bad_lines`, which leaves them out and counts
    them. An index built with skipped lines is only reused by callers that also skip bad lines.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"chat data file not found: {p}")
    index_file, meta_file = index_paths(p)
    sig = _signature(p)
    if not force and index_file.is_file() and meta_file.is_file():
        meta = _read_meta(meta_file, index_file)
        if meta and meta.get("signature") == sig and (skip_bad_lines or meta["bad_lines"] == 0):
            return IndexInfo(p, meta["conversations"], meta["bad_lines"], meta["first_error"], False)
    rows, bad, first_error = _scan(p, skip_bad_lines)
    index_file.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(index_file, lambda t: _save_npy(t, rows))
    meta = {"signature": sig, "conversations": len(rows), "bad_lines": bad, "first_error": first_error}
    _write_atomic(meta_file, lambda t: t.write_text(json.dumps(meta)))
    return IndexInfo(p, len(rows), bad, first_error, True)


class ChatFile:
    """Random access to the conversations of one JSONL, Parquet or Arrow file through its offset index
    (fork-safe)."""

    def __init__(self, path: str | Path, skip_bad_lines: bool = False):
        self.path = Path(path)
        self.info = build_index(self.path, skip_bad_lines)
        self.rows = np.load(index_paths(self.path)[0], mmap_mode="r")
        self.table = TableRows(self.path) if is_columnar(self.path) else None
        self._fd: int | None = None
        self._pid = -1

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fd": None, "_pid": -1}

    def line_number(self, i: int) -> int:
        return int(self.rows[i, 2])

    def __getitem__(self, i: int) -> list[Message]:
        if self.table is not None:
            unit, offset, number = (int(x) for x in self.rows[i])
            return parse_conversation(self.table.row(unit, offset), f"{self.path}, row {number}")
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        start, end, lineno = (int(x) for x in self.rows[i])
        raw = os.pread(self._fd, end - start, start)
        where = f"{self.path}:{lineno}"
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{where}: not valid JSON ({err}); the file changed under its index?") from None
        return parse_conversation(obj, where)


# ----------------------------------------------------------------------------------------------------------
# Rendering and labels
# ----------------------------------------------------------------------------------------------------------


def _render(tokenizer: Any, messages: Sequence[Message], generation_prompt: bool = False) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=generation_prompt
    )


def _common_prefix(a: str, b: str) -> int:
    return len(os.path.commonprefix([a, b]))


def assistant_char_spans(tokenizer: Any, messages: Sequence[Message]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans to train: each assistant content + what follows
    it up to the next message (the end-of-turn marker).

    The text an assistant turn adds is `render(messages[:i+1])` minus `render(messages[:i])`; rendering the
    same turn with a sentinel content shows which part of it is the template's header (not trained) and
    which its trailer (trained). Raises ValueError if the template does not render prefixes consistently.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template")
    full = _render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = _render(tokenizer, messages[:i])
        upto = _render(tokenizer, messages[: i + 1])
        if not full.startswith(upto):
            raise ValueError(
                f"the chat template renders the first {i + 1} messages differently inside the whole "
                "conversation, so assistant turns cannot be located in it"
            )
        start = _common_prefix(prefix, upto)
        probe = _render(tokenizer, [*messages[:i], {"role": "assistant", "content": _SENTINEL}])
        pos = probe.find(_SENTINEL, start)
        header = probe[start:pos] if pos >= 0 else ""
        trailer = probe[pos + len(_SENTINEL) :] if pos >= 0 else ""
        segment = upto[start:]
        if pos >= 0 and segment.startswith(header) and segment.endswith(trailer):
            spans.append((start + len(header), len(upto)))
        else:  # template transforms the content: train all the turn adds after the generation prompt
            gen = _render(tokenizer, messages[:i], generation_prompt=True)
            spans.append((max(start, _common_prefix(gen, upto)), len(upto)))
    return full, spans


@dataclass
class TokenizedChat:
    """Tokens of one conversation and, per token, whether it is a training target."""

    tokens: np.ndarray  # (n,) int64
    trained: np.ndarray  # (n,) bool
    truncated: bool


def tokenize_chat(tokenizer: Any, messages: Sequence[Message], max_tokens: int) -> TokenizedChat:
    """Render and tokenize a conversation, keep at most `max_tokens` tokens, mark the assistant tokens.

    The rendered text already holds the template's special tokens (e.g. BOS), so nothing is added when
    tokenizing. A token is trained when its characters overlap a span of `assistant_char_spans`.
    """
    text, spans = assistant_char_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    trained = np.zeros(len(ids), dtype=bool)
    for lo, hi in spans:
        trained |= (offsets[:, 0] < hi) & (offsets[:, 1] > lo)
    truncated = len(ids) > max_tokens
    return TokenizedChat(ids[:max_tokens], trained[:max_tokens], truncated)


def chat_sample(chat: TokenizedChat) -> dict[str, np.ndarray]:
    """Model inputs of one conversation: input_ids = tokens[:-1], labels[t] = tokens[t+1] where trained."""
    labels = np.where(chat.trained[1:], chat.tokens[1:], IGNORE_INDEX)
    n = len(chat.tokens) - 1
    return {
        "input_ids": chat.tokens[:-1].copy(),
        "labels": labels.astype(np.int64),
        "position_ids": np.arange(n, dtype=np.int64),
    }


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, or its EOS id when it has no pad token (padding is never trained)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has neither a pad nor an EOS token")
    return int(pad)


# ----------------------------------------------------------------------------------------------------------
# Token counts (cached beside the index)
# ----------------------------------------------------------------------------------------------------------


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short hash of what decides token counts: vocabulary, special tokens and the chat template."""
    import hashlib

    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    parts = [vocab, str(tokenizer.chat_template), str(tokenizer.bos_token), str(tokenizer.eos_token)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def conversation_lengths(chats: ChatFile, tokenizer: Any, fingerprint: str | None = None) -> np.ndarray:
    """Token count of every conversation of a file as rendered by `tokenizer`'s chat template (int64).

    Computed once per (file version, tokenizer) and kept in `.index_cache/NAME.lengths-HASH.npy`.
    """
    fingerprint = fingerprint or tokenizer_fingerprint(tokenizer)
    index_file, meta_file = index_paths(chats.path)
    key = json.loads(meta_file.read_text())["signature"]
    name = f"{chats.path.name}.lengths-{fingerprint}-{key['size']}-{key['mtime_ns']}.npy"
    cache = index_file.parent / name
    if cache.is_file():
        lengths = np.load(cache)
        if len(lengths) == len(chats):
            return lengths
    lengths = np.zeros(len(chats), dtype=np.int64)
    batch = 512
    for lo in range(0, len(chats), batch):
        texts = [_render(tokenizer, chats[i]) for i in range(lo, min(lo + batch, len(chats)))]
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        lengths[lo : lo + len(ids)] = [len(x) for x in ids]
    _write_atomic(cache, lambda t: _save_npy(t, lengths))
    return lengths
