"""Fused LM head + cross-entropy: the loss and its gradients in one pass over token chunks.

With a 129k vocabulary the `tokens x vocab` logits dominate training memory (HF materialises them in fp32,
plus softmax and gradient copies of the same size). Here each chunk's logits are turned into the loss and,
immediately, into the gradients for the hidden states and the head weight, then dropped: memory holds one
chunk of logits at a time, and no logits are recomputed in the backward pass (same matmul count as the
unfused head, 3 per chunk, against 4 for a checkpointed chunk).

Needs the head weight as a plain tensor, so engines that shard parameters inside module calls (ZeRO-3)
use `chunked_causal_lm_loss` instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _matmul_dtype(device: torch.device, fallback: torch.dtype) -> torch.dtype:
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return fallback


def _chunk_loss(
    h: Tensor, w: Tensor, target: Tensor, acc: torch.dtype, logit_scale: float, softcap: float | None
) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """One chunk: logits z (C, V) in `acc` precision, tanh(z/cap) when soft-capped, logsumexp (C,) and
    the per-token cross-entropy (C,)."""
    z = F.linear(h, w).to(acc)
    if logit_scale != 1.0:
        z.mul_(logit_scale)
    tanh = None
    if softcap:
        tanh = torch.tanh(z / softcap)
        z = tanh * softcap
    lse = torch.logsumexp(z, dim=-1)
    return z, tanh, lse, lse - z.gather(1, target[:, None]).squeeze(1)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden: Tensor,
        weight: Tensor,
        labels: Tensor,
        chunk_size: int,
        ignore_index: int,
        logit_scale: float,
        softcap: float | None,
    ) -> tuple[Tensor, Tensor]:
        # hidden (N, H), weight (V, H), labels (N,)
        mm_dtype = _matmul_dtype(hidden.device, weight.dtype)
        w = weight.to(mm_dtype)
        grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
        acc = torch.promote_types(mm_dtype, torch.float32)  # softmax and accumulation precision
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        loss_sum = torch.zeros((), dtype=acc, device=hidden.device)
        valid_all = labels != ignore_index
        for start in range(0, hidden.shape[0], chunk_size):
            end = min(start + chunk_size, hidden.shape[0])
            h = hidden[start:end].to(mm_dtype)  # (C, H)
            valid = valid_all[start:end]
            target = labels[start:end].masked_fill(~valid, 0)  # (C,)
            z, tanh, lse, token_loss = _chunk_loss(h, w, target, acc, logit_scale, softcap)
            loss_sum += (token_loss * valid).sum()
            # d loss / d z = softmax(z) - onehot(target), zero for ignored tokens; computed in place in z
            grad_z = z.sub_(lse[:, None]).exp_()
            grad_z[torch.arange(end - start, device=z.device), target] -= 1.0
            grad_z.mul_(valid[:, None])
            if tanh is not None:
                grad_z.mul_(1.0 - tanh * tanh)
            if logit_scale != 1.0:
                grad_z.mul_(logit_scale)
            g = grad_z.to(mm_dtype)
            grad_hidden[start:end] = (g @ w).to(hidden.dtype)
            grad_weight.add_(g.t() @ h)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss_sum, valid_all.sum()

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_count: Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (
            grad_hidden * grad_loss.to(grad_hidden.dtype),
            (grad_weight * grad_loss).to(ctx.weight_dtype),
            None,
            None,
            None,
            None,
            None,
        )


def fused_linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    chunk_size: int = 1024,
    ignore_index: int = -100,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Sum of token cross-entropies of `hidden @ weight.T` against `labels` (already shifted), and the count
    of counted tokens. hidden (..., H), weight (V, H), labels (...). Differentiable in hidden and weight."""
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1)
    if not (torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)):
        return _loss_only(
            flat_hidden, weight, flat_labels, max(int(chunk_size), 1), ignore_index, logit_scale, softcap
        )
    return _FusedLinearCrossEntropy.apply(
        flat_hidden, weight, flat_labels, max(int(chunk_size), 1), ignore_index, float(logit_scale), softcap
    )


def _loss_only(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    chunk_size: int,
    ignore_index: int,
    logit_scale: float,
    softcap: float | None,
) -> tuple[Tensor, Tensor]:
    """Evaluation: the same loss without computing any gradient."""
    mm_dtype = _matmul_dtype(hidden.device, weight.dtype)
    w = weight.to(mm_dtype)
    acc = torch.promote_types(mm_dtype, torch.float32)
    loss_sum = torch.zeros((), dtype=acc, device=hidden.device)
    valid_all = labels != ignore_index
    for start in range(0, hidden.shape[0], chunk_size):
        valid = valid_all[start : start + chunk_size]
        target = labels[start : start + chunk_size].masked_fill(~valid, 0)
        h = hidden[start : start + chunk_size].to(mm_dtype)
        token_loss = _chunk_loss(h, w, target, acc, logit_scale, softcap)[3]
        loss_sum += (token_loss * valid).sum()
    return loss_sum, valid_all.sum()
