"""Turning pre-training samples into model inputs: shifted labels, position ids, document masking."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


def reset_positions(doc_starts: np.ndarray, length: int) -> np.ndarray:
    """Position ids that restart at 0 at every document start (`doc_starts` sorted, includes 0)."""
    starts = np.asarray(doc_starts, dtype=np.int64)
    segment = np.zeros(length, dtype=np.int64)
    segment[starts[starts < length]] = 1
    seg_id = np.cumsum(segment) - 1  # index into starts of the document each token belongs to
    return np.arange(length, dtype=np.int64) - starts[np.maximum(seg_id, 0)]


class PretrainCollator:
    """samples (dicts with `tokens` (L+1,) and `doc_starts`) -> input_ids, labels, position_ids, attention_mask.

    reset_position_ids: positions restart at each document; with reset_attention_mask the attention mask is
    left out, so transformers sees the restarting positions as packed sequences and keeps attention inside
    each document; without it an all-ones mask is passed so attention still spans the whole sample.
    """

    def __init__(self, reset_position_ids: bool = False, reset_attention_mask: bool = False):
        self.reset_position_ids = reset_position_ids
        self.reset_attention_mask = reset_attention_mask

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        tokens = torch.from_numpy(np.stack([np.asarray(s["tokens"], dtype=np.int64) for s in samples]))
        batch = {"input_ids": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()}
        if self.reset_position_ids:
            length = tokens.shape[1] - 1
            pos = np.stack([reset_positions(s["doc_starts"], length) for s in samples])
            batch["position_ids"] = torch.from_numpy(pos)
            if not self.reset_attention_mask:
                batch["attention_mask"] = torch.ones(tokens.shape[0], length, dtype=torch.long)
        return batch
