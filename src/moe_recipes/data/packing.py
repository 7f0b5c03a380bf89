"""Which conversations make up each chat sample, and how samples become model inputs.

* `epoch_order`: one epoch of a weighted mixture of files, shuffled deterministically per epoch.
* `pack_lengths`: several conversations per sequence (first fit over a few open sequences, in order), so
  almost no compute goes to padding.
* `SampleTable` + `ChatDataset`: sample k -> its conversations, tokenized, concatenated, with position ids
  that restart at every conversation.
* `ChatCollator`: pads a micro-batch with the tokenizer's pad id (labels -100 there). Packed batches carry
  restarting `position_ids` and no attention mask, so transformers treats each conversation as a separate
  sequence and attention never crosses one, plus `real_tokens` (0 on the padded tails) that only the
  objective reads, to leave padding out of the router statistics; unpacked batches carry a 2D attention
  mask (0 on padding).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from moe_recipes.data.chat import IGNORE_INDEX, Message, chat_sample, tokenize_chat

# Conversations wait in at most this many partly filled sequences before the oldest is closed.
OPEN_BINS = 16


def pack_lengths(lengths: Sequence[int] | np.ndarray, capacity: int) -> list[list[int]]:
    """Group item indices into bins of total length <= capacity (first fit over the OPEN_BINS newest bins).

    Items keep their order inside a bin; an item longer than `capacity` is a ValueError (truncate first).
    """
    bins: list[list[int]] = []
    room: list[int] = []
    first_open = 0
    for i, n in enumerate(int(x) for x in lengths):
        if n > capacity:
            raise ValueError(f"item {i} has {n} tokens, more than the packing capacity {capacity}")
        for b in range(first_open, len(bins)):
            if room[b] >= n:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(capacity - n)
            first_open = max(first_open, len(bins) - OPEN_BINS)
    return bins


def epoch_order(
    pools: Sequence[np.ndarray], weights: Sequence[float] | None, epoch: int, seed: int
) -> np.ndarray:
    """Conversation ids of one epoch of the mixture, shuffled.

    Without weights every pool is taken once. With weights, an epoch has as many conversations as the pools
    hold together, pool p contributing round(weight_p * total) of them, cycling through its own reshuffled
    copies when it has fewer (pass q of pool p is shuffled by (seed, p, q), so epochs continue each other).
    """
    total = sum(len(p) for p in pools)
    if weights is None:
        counts = [len(p) for p in pools]
    else:
        counts = [round(w * total) for w in weights]
    parts = []
    for p, (pool, k) in enumerate(zip(pools, counts)):
        if k == 0 or len(pool) == 0:
            continue
        start = (epoch * k) if weights is not None else 0
        passes = range(start // len(pool), (start + k - 1) // len(pool) + 1)
        stream = np.concatenate([np.random.default_rng([seed, p, q]).permutation(pool) for q in passes])
        offset = start - passes[0] * len(pool)
        parts.append(stream[offset : offset + k])
    order = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    return np.random.default_rng([seed, 1_000_003, epoch]).permutation(order).astype(np.int64)


@dataclass
class SampleTable:
    """Samples as ranges of a flat conversation-id array: sample k = conv_ids[bounds[k]:bounds[k+1]]."""

    conv_ids: np.ndarray
    bounds: np.ndarray
    epoch_ends: list[int]

    def __len__(self) -> int:
        return len(self.bounds) - 1

    @classmethod
    def empty(cls) -> SampleTable:
        return cls(np.zeros(0, dtype=np.int64), np.zeros(1, dtype=np.int64), [])

    def extend(self, order: np.ndarray, input_lengths: np.ndarray | None, capacity: int) -> None:
        """Append one epoch: one sample per conversation, or packed bins when `input_lengths` is given."""
        if input_lengths is None:
            sizes = np.ones(len(order), dtype=np.int64)
            flat = order
        else:
            bins = pack_lengths(input_lengths[order], capacity)
            sizes = np.array([len(b) for b in bins], dtype=np.int64)
            flat = order[np.concatenate(bins)] if bins else order
        self.conv_ids = np.concatenate([self.conv_ids, flat])
        self.bounds = np.concatenate([self.bounds, self.bounds[-1] + np.cumsum(sizes)])
        self.epoch_ends.append(len(self))


class ChatDataset:
    """Map-style dataset of chat samples: `ds[k]` -> input_ids, labels (shifted), position_ids (numpy).

    `read(conv_id)` returns a conversation's messages; `wrap` makes indices past the end start over (for
    validation sets smaller than the evaluation asks for).
    """

    def __init__(
        self,
        table: SampleTable,
        read: Callable[[int], list[Message]],
        tokenizer: Any,
        seq_length: int,
        wrap: bool = False,
    ):
        self.table = table
        self.read = read
        self.tokenizer = tokenizer
        self.seq_length = seq_length
        self.wrap = wrap

    def __len__(self) -> int:
        return len(self.table)

    def conversations(self, k: int) -> np.ndarray:
        """Conversation ids in sample k."""
        if self.wrap and len(self.table):
            k %= len(self.table)
        if not 0 <= k < len(self.table):
            raise IndexError(f"chat sample {k} out of range (0..{len(self.table) - 1})")
        t = self.table
        return t.conv_ids[t.bounds[k] : t.bounds[k + 1]]

    def __getitem__(self, k: int) -> dict[str, np.ndarray]:
        parts = [
            chat_sample(tokenize_chat(self.tokenizer, self.read(int(c)), self.seq_length + 1))
            for c in self.conversations(k)
        ]
        return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


class ChatCollator:
    """Chat samples -> a right-padded batch (see the module docstring for packed vs. unpacked)."""

    def __init__(self, pad_id: int, packed: bool):
        self.pad_id = pad_id
        self.packed = packed

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(s["input_ids"]) for s in samples)
        n = len(samples)
        input_ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        positions = torch.zeros((n, width), dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for row, s in enumerate(samples):
            k = len(s["input_ids"])
            input_ids[row, :k] = torch.as_tensor(np.asarray(s["input_ids"]))
            labels[row, :k] = torch.as_tensor(np.asarray(s["labels"]))
            positions[row, :k] = torch.as_tensor(np.asarray(s["position_ids"]))
            # padding is a segment of its own (positions from 0) so it never joins a conversation
            positions[row, k:] = torch.arange(width - k)
            mask[row, :k] = 1
        batch = {"input_ids": input_ids, "labels": labels}
        if self.packed:
            batch["position_ids"] = positions
            batch["real_tokens"] = mask  # not for the model: keeps padded tails out of router statistics
        else:
            batch["attention_mask"] = mask
        return batch


# ----------------------------------------------------------------------------------------------------------
# Train/valid sets from a training config
# ----------------------------------------------------------------------------------------------------------


def parse_chat_paths(path: Any) -> tuple[list[str], list[float] | None]:
    """`data.path` of a chat config -> (files, normalised weights or None).

    A file, a list of files (each taken once per epoch), or a blend [w1, file1, w2, file2, ...].
    """
    items = [path] if isinstance(path, str) else list(path or [])
    if not items:
        raise ValueError("data.path must name chat files (JSONL, Parquet or Arrow)")

    def number(x: Any) -> float | None:
        if isinstance(x, bool):
            return None
        try:
            return float(x)
        except (TypeError, ValueError):
            return None

    weighted = len(items) % 2 == 0 and all(number(items[k]) is not None for k in range(0, len(items), 2))
    if not weighted:
        bad = [x for x in items if not isinstance(x, str)]
        if bad:
            raise ValueError(f"data.path: {bad[0]!r} is not a file name (blends look like [w1, f1, w2, f2])")
        return [str(x) for x in items], None
    weights = [number(items[k]) for k in range(0, len(items), 2)]
    if any(w is None or not np.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:  # type: ignore[operator]
        raise ValueError(f"data.path: blend weights must be finite, >= 0 and not all 0, got {weights}")
    total = float(sum(weights))  # type: ignore[arg-type]
    return [str(items[k]) for k in range(1, len(items), 2)], [w / total for w in weights]  # type: ignore[operator]


def split_pools(sizes: Sequence[int], split: str, seed: int) -> list[list[np.ndarray]]:
    """Per file, its conversation ids (global numbering) of the train, valid and test parts.

    Each file's conversations are shuffled once (by seed and file) and cut by the `data.split` proportions.
    """
    try:
        fractions = np.array([float(x) for x in split.split(",")], dtype=np.float64)
    except ValueError:
        raise ValueError(f"data.split={split!r} should be three numbers like 969,30,1") from None
    if len(fractions) != 3 or (fractions < 0).any() or fractions.sum() <= 0:
        raise ValueError(f"data.split={split!r} should be three proportions >= 0, not all 0")
    fractions /= fractions.sum()
    pools, first = [], 0
    for f, n in enumerate(sizes):
        order = first + np.random.default_rng([seed, f, 7]).permutation(n)
        cuts = np.round(np.cumsum(fractions) * n).astype(np.int64)
        pools.append([order[: cuts[0]], order[cuts[0] : cuts[1]], order[cuts[1] :]])
        first += n
    return pools


class ConversationSet:
    """The conversations of several chat files under one global numbering (file after file)."""

    def __init__(self, files: Sequence[Any]):
        self.files = list(files)
        self.starts = np.cumsum([0] + [len(f) for f in self.files])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def locate(self, conv_id: int) -> tuple[int, int]:
        """Global id -> (file number, line of the conversation in its file)."""
        f = int(np.searchsorted(self.starts, conv_id, side="right")) - 1
        return f, int(conv_id - self.starts[f])

    def __call__(self, conv_id: int) -> list[Message]:
        f, row = self.locate(conv_id)
        return self.files[f][row]


def train_table(
    pools: Sequence[np.ndarray],
    weights: Sequence[float] | None,
    input_lengths: np.ndarray | None,
    capacity: int,
    seed: int,
    samples: int | None = None,
    epochs: float | None = None,
) -> tuple[SampleTable, int]:
    """Training samples: whole epochs until `samples` are covered, or `epochs` epochs (fractions allowed).

    Returns the table and the number of samples asked for (`samples`, or what `epochs` amounts to).
    """
    table = SampleTable.empty()
    if sum(len(p) for p in pools) == 0:
        raise ValueError("data.split leaves no training conversations in data.path")
    if epochs is not None:
        whole = int(np.floor(epochs))
        for e in range(whole + (epochs > whole)):
            table.extend(epoch_order(pools, weights, e, seed), input_lengths, capacity)
        ends = [0, *table.epoch_ends]
        samples = ends[whole] + int(np.ceil((epochs - whole) * (ends[-1] - ends[whole])))
    assert samples is not None
    extend_to(table, samples, pools, weights, input_lengths, capacity, seed)
    return table, samples


def extend_to(
    table: SampleTable,
    samples: int,
    pools: Sequence[np.ndarray],
    weights: Sequence[float] | None,
    input_lengths: np.ndarray | None,
    capacity: int,
    seed: int,
) -> None:
    """Append whole epochs to `table` until it has at least `samples` samples."""
    while len(table) < samples:
        table.extend(epoch_order(pools, weights, len(table.epoch_ends), seed), input_lengths, capacity)


def _is_main_process() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


def build_chat_data(cfg: Any) -> Any:
    """`data.format: chat` -> TrainingData (train, valid, collate) for the trainer.

    Tokenizer: the one in `model.path`. With `train.epochs` set, `cfg.train.iters` is replaced by
    ceil(samples of those epochs / global batch) before anything uses it. Prints one summary line
    (conversations, skipped lines, truncations, packing fill) on rank 0.
    """
    from transformers import AutoTokenizer

    from moe_recipes.data.chat import ChatFile, conversation_lengths, pad_token_id, tokenizer_fingerprint
    from moe_recipes.data.factory import TrainingData

    d, t = cfg.data, cfg.train
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    paths, weights = parse_chat_paths(d.path)
    files = [ChatFile(p, skip_bad_lines=d.skip_bad_lines) for p in paths]
    convs = ConversationSet(files)
    fingerprint = tokenizer_fingerprint(tokenizer)
    lengths = np.concatenate([conversation_lengths(f, tokenizer, fingerprint) for f in files])
    truncated = int((lengths > d.seq_length + 1).sum())
    input_lengths = np.minimum(lengths, d.seq_length + 1) - 1 if d.packing else None
    pools = split_pools([len(f) for f in files], d.split, t.seed)
    train_pools = [p[0] for p in pools]
    needed = None if t.epochs is not None else t.iters * t.global_batch_size
    table, samples = train_table(
        train_pools, weights, input_lengths, d.seq_length, t.seed, samples=needed, epochs=t.epochs
    )
    if t.epochs is not None:
        t.iters = max(1, -(-samples // t.global_batch_size))
        n = t.iters * t.global_batch_size
        extend_to(table, n, train_pools, weights, input_lengths, d.seq_length, t.seed)
    valid_ids = np.concatenate([p[1] for p in pools])
    valid = None
    if len(valid_ids):
        vtable = SampleTable.empty()
        vtable.extend(epoch_order([valid_ids], None, 0, t.seed), input_lengths, d.seq_length)
        valid = ChatDataset(vtable, convs, tokenizer, d.seq_length, wrap=True)
    if _is_main_process():
        _print_summary(cfg, files, lengths, truncated, table, samples)
    train = ChatDataset(table, convs, tokenizer, d.seq_length)
    return TrainingData(train, valid, ChatCollator(pad_token_id(tokenizer), packed=d.packing))


def _print_summary(
    cfg: Any, files: Sequence[Any], lengths: np.ndarray, truncated: int, table: SampleTable, samples: int
) -> None:
    d, t = cfg.data, cfg.train
    bad = sum(f.info.bad_lines for f in files)
    first_epoch = table.epoch_ends[0]
    lines = [
        f"[moe-recipes] chat data: {len(lengths)} conversations in {len(files)} file(s)"
        + (f", {bad} invalid line(s) skipped" if bad else ""),
        f"{truncated} conversation(s) longer than data.seq_length+1={d.seq_length + 1} tokens truncated",
    ]
    if d.packing:
        used = table.conv_ids[: table.bounds[first_epoch]]
        fill = float(np.minimum(lengths[used], d.seq_length + 1).sum() - len(used))
        lines.append(
            f"packed {first_epoch} sequences per epoch, {fill / (first_epoch * d.seq_length):.1%} filled"
        )
    else:
        lines.append(f"{first_epoch} samples per epoch")
    if t.epochs is not None:
        lines.append(f"train.epochs={t.epochs} -> {samples} samples -> train.iters={t.iters}")
    print("; ".join(lines), file=sys.stderr, flush=True)
