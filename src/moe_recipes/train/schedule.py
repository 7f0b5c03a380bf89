"""Learning-rate schedules: linear warmup, then cosine / linear / constant / warmup-stable-decay.

The schedule is a pure function of the step, so resuming needs nothing but the step number.
"""

from __future__ import annotations

import math

from moe_recipes.config import OptimConfig


def lr_at(step: int, cfg: OptimConfig, total_iters: int) -> float:
    """Learning rate for optimizer step `step` (0-based: the first update uses lr_at(0))."""
    warmup = cfg.warmup_iters
    if warmup > 0 and step < warmup:
        return cfg.lr * (step + 1) / warmup
    decay_iters = cfg.decay_iters if cfg.decay_iters is not None else total_iters
    if cfg.decay_style == "constant":
        return cfg.lr
    span = max(decay_iters - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    delta = cfg.lr - cfg.min_lr
    if cfg.decay_style == "cosine":
        return cfg.min_lr + delta * 0.5 * (1.0 + math.cos(math.pi * progress))
    if cfg.decay_style == "linear":
        return cfg.lr - delta * progress
    # wsd: stable at lr, then a linear decay over the last wsd_decay_fraction of the decay span
    stable = 1.0 - cfg.wsd_decay_fraction
    if progress <= stable or cfg.wsd_decay_fraction == 0:
        return cfg.lr
    return cfg.lr - delta * (progress - stable) / cfg.wsd_decay_fraction
