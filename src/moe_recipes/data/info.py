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


def blend_weights(tokens: list[int], ratios: list[float] | None = None) -> list[float]:
    """Weights of a `data.path` blend: each prefix's share of all tokens, or the given ratios normalised.

    Blending draws samples (fixed-length token sequences) in proportion to the weights, so weights by
    tokens read every prefix once per pass, in the proportions the data has.
    """
    if ratios is not None:
        if len(ratios) != len(tokens):
            raise ValueError(f"{len(ratios)} ratios given for {len(tokens)} prefixes")
        if any(r < 0 for r in ratios) or sum(ratios) <= 0:
            raise ValueError(f"ratios must be >= 0 with a positive sum, got {ratios}")
        raw = [float(r) for r in ratios]
    else:
        if sum(tokens) <= 0:
            raise ValueError("the datasets hold no tokens: nothing to weight")
        raw = [float(t) for t in tokens]
    total = sum(raw)
    return [round(r / total, 6) for r in raw]


def blend_report(prefixes: list[str], ratios: list[float] | None = None) -> str:
    """Tokens of each prefix and a ready-to-paste `data.path` blend weighted by tokens or by `ratios`.

    With ratios, the last column says how many passes over each prefix one pass over the blend's tokens
    makes (above 1: that prefix is repeated; below 1: part of it is never read).
    """
    datasets = [IndexedDataset(_strip_suffix(p)) for p in prefixes]
    tokens = [ds.num_tokens for ds in datasets]
    weights = blend_weights(tokens, ratios)
    total = sum(tokens)
    width = max(len(ds.prefix) for ds in datasets)
    lines = [f"{'prefix':<{width}} {'documents':>10} {'tokens':>14} {'share':>7} {'weight':>8} {'passes':>7}"]
    for ds, n, w in zip(datasets, tokens, weights):
        share = n / total if total else 0.0
        passes = f"{w / share:.2f}" if share else "-"
        lines.append(f"{ds.prefix:<{width}} {len(ds):>10} {n:>14} {share:>7.2%} {w:>8.4f} {passes:>7}")
    lines.append(f"{'total':<{width}} {sum(len(ds) for ds in datasets):>10} {total:>14}")
    pairs = ", ".join(f"{w:g}, {ds.prefix}" for ds, w in zip(datasets, weights))
    lines += [
        "",
        f"data.path weighted by {'the given ratios' if ratios is not None else 'tokens'}:",
        f"  YAML:     path: [{pairs}]",
        f'  override: data.path="[{pairs}]"',
    ]
    return "\n".join(lines)
