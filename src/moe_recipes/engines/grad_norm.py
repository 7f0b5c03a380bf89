"""The gradient norm as every engine reports and clips it: squares summed in fp64, `clip_grad_norm_`'s
coefficient.

fp64 because torch's fp32 norm of a large gradient on CPU (the 2M-element embedding of a 4M-parameter
model) was 3-5e-5 off, more than the differences between two sharding layouts of the same run, which
the parity tests compare at 1e-5.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def squared_sum(grads: Iterable[torch.Tensor], device: torch.device | str = "cpu") -> torch.Tensor:
    """Sum of the squares of every element of `grads`, an fp64 scalar (on `device` when `grads` is empty)."""
    squares = [g.detach().double().pow(2).sum() for g in grads]
    if not squares:
        return torch.zeros((), dtype=torch.float64, device=device)
    return torch.stack(squares).sum()


@torch.no_grad()
def clip_to(grads: Iterable[torch.Tensor], norm: torch.Tensor, max_norm: float) -> None:
    """Scale `grads` in place by `clip_grad_norm_`'s coefficient, min(1, max_norm / (norm + 1e-6))."""
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.to(device=g.device, dtype=g.dtype))
