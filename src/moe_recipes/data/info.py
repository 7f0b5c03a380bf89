"""`moe-recipes data-info`: statistics and a decoded sample of an indexed dataset (.bin/.idx).

Meant as the quick check after `prepare`: are there as many documents and tokens as expected, does
the largest token id fit the model's vocabulary, and does a document decode to the text it came from
(with BOS/EOS where they should be)?
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np

from moe_recipes.data.indexed import IndexedDataset, bin_path

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# The largest id is found in slices of this many tokens so that a large .bin is never copied whole.
MAX_SCAN_TOKENS = 1 << 24


def _strip_suffix(prefix: str | os.PathLike) -> str:
    """Accept `PREFIX`, `PREFIX.bin` or `PREFIX.idx`."""
    text = str(prefix)
    for suffix in (".bin", ".idx"):
        if text.endswith(suffix):
            return text[: -len(suffix)]
    return text


def largest_token_id(ds: IndexedDataset, max_tokens: int | None = None) -> int | None:
    """Largest token id in the dataset (None when it holds no token).

    With `max_tokens`, a dataset larger than that is sampled instead of read whole: 64 evenly spaced
    windows, the first and last included, that add up to `max_tokens` tokens.
    """
    total = ds.num_tokens
    if total == 0:
        return None
    flat = np.memmap(bin_path(ds.prefix), dtype=ds.dtype, mode="r")
    if max_tokens is None or total <= max_tokens:
        starts, width = range(0, total, MAX_SCAN_TOKENS), MAX_SCAN_TOKENS
    else:
        windows = 64
        width = max(1, max_tokens // windows)
        starts = np.linspace(0, total - width, windows).astype(np.int64).tolist()
    return max(int(flat[i : i + width].max()) for i in starts)


def _sample_lines(
    ds: IndexedDataset, tokenizer: PreTrainedTokenizerBase | None, index: int, count: int
) -> list[str]:
    if not 0 <= index < len(ds):
        raise ValueError(f"sample_index {index} is out of range: {ds.prefix} has {len(ds)} documents")
    if count < 1:
        raise ValueError(f"sample_tokens must be >= 1, got {count}")
    size = int(ds.sizes[index])
    ids = [int(t) for t in ds.get(index, 0, min(count, size))]
    lines = [f"sample: document {index}, first {len(ids)} of {size} tokens", f"  ids: {ids}"]
    if tokenizer is None:
        lines.append("  (pass --tokenizer to decode)")
        return lines
    lines.append(f"  text: {tokenizer.decode(ids, skip_special_tokens=False)!r}")
    return lines


def _vocab_line(largest: int | None, tokenizer: PreTrainedTokenizerBase | None) -> str:
    line = f"largest token id: {largest}"
    if tokenizer is None or largest is None:
        return line
    vocab = len(tokenizer)
    verdict = "fits" if largest < vocab else "DOES NOT FIT"
    return f"{line} ({verdict} the tokenizer's {vocab} ids)"


def data_info(prefix: str, tokenizer_dir: str | None, sample_index: int = 0, sample_tokens: int = 64) -> str:
    """A human-readable report on PREFIX.{bin,idx}: counts, dtype, vocabulary bound, lengths, a sample.

    `prefix` may also be given with its `.bin` or `.idx` suffix. Without `tokenizer_dir` the sample is
    printed as ids only. ValueError for an out-of-range `sample_index`; FileNotFoundError when the
    files are missing.
    """
    ds = IndexedDataset(_strip_suffix(prefix))
    tokenizer = None
    if tokenizer_dir is not None:
        from moe_recipes.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tokenizer_dir)
    sizes = ds.sizes.astype(np.int64)
    lines = [
        f"dataset: {ds.prefix}",
        f"documents: {len(ds)}",
        f"tokens: {ds.num_tokens}",
        f"dtype: {ds.dtype.name}",
        _vocab_line(largest_token_id(ds), tokenizer),
    ]
    if len(ds):
        lines.append(
            f"document length (tokens): min {int(sizes.min())}, mean {float(sizes.mean()):.1f}, "
            f"max {int(sizes.max())}"
        )
        lines += _sample_lines(ds, tokenizer, sample_index, sample_tokens)
    return "\n".join(lines)
