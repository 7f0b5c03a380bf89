"""MoE auxiliary losses from captured router calls, and a chunked (memory-light) LM cross-entropy.

Router losses take what ``RouterCapture.layers()`` returns: per MoE layer the router logits
``(tokens, E)`` and the experts the router actually selected ``(tokens, top_k)``. Using the router's own
selection (not a softmax top-k recomputed from the logits, as HF's ``load_balancing_loss_func`` does)
keeps the statistics right for routers that select differently, e.g. DeepSeek's sigmoid + bias +
group-limited routing; for softmax top-k routers (Mixtral, Qwen2/Qwen3-MoE, OLMoE) the two are the same.

The Switch load-balancing loss comes in two forms (``AUX_LOSS_TYPES``, config key ``moe.aux_loss_type``):

* ``"hf"`` (default): exactly HF's ``load_balancing_loss_func`` (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE),
  the loss these models were trained with under their ``router_aux_loss_coef``: ``f`` and ``P`` are pooled
  over all MoE layers (``pooled_load_balancing_loss``), ``f_i`` counts the selections of expert ``i`` per
  token (it sums to ``top_k``), so perfectly even routing gives ``top_k``.
* ``"per_layer"``: Switch/Megatron normalisation, one loss per layer with ``f_i`` the share of routing
  slots (it sums to 1; even routing gives 1), averaged over the layers (``load_balancing_loss``). For one
  layer it is ``hf / top_k``, so ``top_k x`` a checkpoint's ``router_aux_loss_coef`` gives the same
  pull; Megatron-LM adds its per-layer losses up, so its ``moe_aux_loss_coeff`` ``c`` is
  ``c x (number of MoE layers)`` here. Unlike pooling, it also penalises layers whose imbalances cancel
  out when the layers are pooled.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from moe_recipes.models.registry import LOGITS_SCALING_MULTIPLIES


def token_weights(mask: Tensor | None, tokens: int, device: torch.device) -> Tensor:
    """Mask as float weights ``(tokens,)``: 1 for counted tokens, 0 for padding."""
    if mask is None:
        return torch.ones(tokens, dtype=torch.float32, device=device)
    flat = mask.reshape(-1)
    if flat.numel() != tokens:
        raise ValueError(
            f"mask has {flat.numel()} elements (shape {tuple(mask.shape)}), router saw {tokens} tokens"
        )
    return flat.to(device=device, dtype=torch.float32)


AUX_LOSS_TYPES = ("hf", "per_layer")


def _routing_sums(
    logits: Tensor, indices: Tensor, num_experts: int, top_k: int, mask: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """One layer's selections per expert ``(E,)`` (no gradient), summed router probabilities per expert
    ``(E,)`` (with gradient) and the number of counted tokens, all in fp32; masked tokens count in none."""
    if logits.dim() != 2 or logits.shape[-1] != num_experts:
        raise ValueError(f"logits must be (tokens, {num_experts}), got {tuple(logits.shape)}")
    if indices.shape != (logits.shape[0], top_k):
        raise ValueError(
            f"indices must be (tokens, top_k) = {(logits.shape[0], top_k)}, got {tuple(indices.shape)}"
        )
    weights = token_weights(mask, logits.shape[0], logits.device)  # (tokens,)
    probs = logits.float().softmax(dim=-1)  # (tokens, E)
    slot_weights = weights.repeat_interleave(top_k)  # (tokens * top_k,)
    selections = torch.zeros(num_experts, dtype=torch.float32, device=logits.device)
    selections.index_add_(0, indices.reshape(-1).to(logits.device), slot_weights)  # (E,)
    return selections, (probs * weights[:, None]).sum(dim=0), weights.sum()


def load_balancing_loss(
    logits: Tensor, indices: Tensor, num_experts: int, top_k: int, mask: Tensor | None = None
) -> Tensor:
    """Switch-Transformer load-balancing loss of one MoE layer, Megatron-normalised: ``E * sum_i f_i * P_i``.

    ``f_i`` = fraction of the ``tokens * top_k`` routing slots sent to expert ``i`` (from ``indices``, no
    gradient), ``P_i`` = mean router softmax probability of expert ``i`` (carries the gradient). Masked
    tokens (``mask == 0``, padding) count in neither. Perfectly uniform routing gives 1.0, the minimum.
    This is ``pooled_load_balancing_loss`` (HF's) of this one layer divided by ``top_k``.
    """
    selections, prob_sums, counted = _routing_sums(logits, indices, num_experts, top_k, mask)
    counted = counted.clamp_min(1.0)
    fraction = selections / (counted * top_k)  # f_i, sums to 1
    return num_experts * (fraction * (prob_sums / counted)).sum()


def pooled_load_balancing_loss(
    captured: list[tuple[Tensor, Tensor]], num_experts: int, top_k: int, mask: Tensor | None = None
) -> Tensor:
    """HF's ``load_balancing_loss_func`` (Mixtral, Qwen2/Qwen3-MoE, OLMoE): ``E * sum_i f_i * P_i`` with
    ``f`` and ``P`` pooled over the captured MoE layers, as HF concatenates the layers' router logits.

    ``f_i`` = selections of expert ``i`` per counted token, over all layers (sums to ``top_k``), ``P_i`` =
    mean router softmax probability over all layers' counted tokens; ``mask`` as HF's
    ``attention_mask``. Even routing gives ``top_k``. Equal to HF's function, value and gradient, when
    ``indices`` are the softmax top-k (HF recomputes them from the logits; here the router's own are used).
    """
    selections = prob_sums = rows = None
    for logits, indices in captured:
        s, p, n = _routing_sums(logits, indices, num_experts, top_k, mask)
        selections = s if selections is None else selections + s.to(selections.device)
        prob_sums = p if prob_sums is None else prob_sums + p.to(prob_sums.device)
        rows = n if rows is None else rows + n.to(rows.device)
    if selections is None:
        raise ValueError("pooled_load_balancing_loss needs at least one captured MoE layer")
    rows = rows.clamp_min(1.0)
    return num_experts * ((selections / rows) * (prob_sums / rows)).sum()


def switch_loss(
    captured: list[tuple[Tensor, Tensor]],
    num_experts: int,
    top_k: int,
    mask: Tensor | None = None,
    aux_loss_type: str = "hf",
) -> Tensor:
    """The micro-batch Switch loss of the captured layers: ``"hf"`` pooled over layers (HF's function) or
    ``"per_layer"`` (Megatron-normalised per-layer losses, averaged); see the module docstring."""
    if aux_loss_type == "hf":
        return pooled_load_balancing_loss(captured, num_experts, top_k, mask)
    if aux_loss_type == "per_layer":
        return torch.stack(
            [load_balancing_loss(lg, ix, num_experts, top_k, mask) for lg, ix in captured]
        ).mean()
    raise ValueError(f"aux_loss_type must be one of {', '.join(AUX_LOSS_TYPES)}, got {aux_loss_type!r}")


def router_z_loss(logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """ST-MoE router z-loss: mean over (unmasked) tokens of ``logsumexp(logits)^2``, in fp32.

    Keeps router logits small, which keeps the softmax (and bf16 routing) numerically stable.
    """
    weights = token_weights(mask, logits.shape[0], logits.device)  # (tokens,)
    z = torch.logsumexp(logits.float(), dim=-1)  # (tokens,)
    return (z.square() * weights).sum() / weights.sum().clamp_min(1.0)


def moe_losses(
    captured: list[tuple[Tensor, Tensor]],
    num_experts: int,
    top_k: int,
    mask: Tensor | None = None,
    device: torch.device | str | None = None,
    aux_loss_type: str = "hf",
) -> tuple[Tensor, Tensor]:
    """(load-balancing loss of ``switch_loss``, z-loss averaged over the captured MoE layers).

    With no routers (dense model) both are fp32 zeros on ``device`` (else the mask's device, else CPU),
    so ``loss + coef * aux`` works unchanged.
    """
    if not captured:
        where = device if device is not None else (mask.device if mask is not None else "cpu")
        zero = torch.zeros((), dtype=torch.float32, device=where)
        return zero, zero.clone()
    aux = switch_loss(captured, num_experts, top_k, mask, aux_loss_type)
    z = torch.stack([router_z_loss(lg, mask) for lg, _ in captured]).mean()
    return aux, z


def expert_counts(
    captured: list[tuple[Tensor, Tensor]], num_experts: int, mask: Tensor | None = None
) -> Tensor:
    """Routing slots per expert per layer, ``(layers, E)`` int64, for expert-load logging.

    Padding tokens (``mask == 0``) are left out when a mask is given.
    """
    rows = []
    for _, indices in captured:
        tokens, top_k = indices.shape
        if mask is None:
            slot_weights = torch.ones(tokens * top_k, dtype=torch.int64, device=indices.device)
        else:
            slot_weights = (token_weights(mask, tokens, indices.device) != 0).long().repeat_interleave(top_k)
        row = torch.zeros(num_experts, dtype=torch.int64, device=indices.device)
        rows.append(row.index_add_(0, indices.reshape(-1), slot_weights))
    if not rows:
        return torch.zeros((0, num_experts), dtype=torch.int64)
    return torch.stack(rows)


def _chunk_cross_entropy(
    hidden: Tensor,
    labels: Tensor,
    lm_head: nn.Module,
    ignore_index: int,
    logit_scale: float,
    softcap: float | None,
) -> Tensor:
    """Summed fp32 cross-entropy of one chunk; its logits live only inside this call."""
    logits = lm_head(hidden).float()  # (chunk, vocab)
    if logit_scale != 1.0:
        logits = logits * logit_scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")


def chunked_causal_lm_loss(
    hidden: Tensor,
    lm_head: nn.Module,
    labels: Tensor,
    chunk_size: int = 1024,
    ignore_index: int = -100,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> tuple[Tensor, Tensor]:
    """(sum of token cross-entropies, number of counted tokens) without materialising all logits.

    ``hidden`` is ``(..., H)`` (the final-norm output), ``labels`` has the same leading shape and is
    already aligned with it (``labels[t]`` is the target of position ``t``: shift before calling). The
    tokens are flattened and split into chunks of ``chunk_size``; each chunk's logits are computed in
    fp32, reduced to a summed CE and dropped, then recomputed in backward (non-reentrant
    ``torch.utils.checkpoint``), so at most one ``(chunk, vocab)`` block lives at a time instead of the
    whole ``(tokens, vocab)`` tensor plus its fp32 copy and gradient. ``lm_head`` is called as a module,
    so FSDP/ZeRO-3 gather hooks run on each call. Equal (in value and gradients) to
    ``F.cross_entropy(logits, labels, reduction="sum")`` on the full logits.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])  # (tokens, H)
    flat_labels = labels.reshape(-1).to(flat_hidden.device)  # (tokens,)
    if flat_hidden.shape[0] != flat_labels.shape[0]:
        raise ValueError(f"hidden has {flat_hidden.shape[0]} tokens but labels has {flat_labels.shape[0]}")
    args = (lm_head, ignore_index, float(logit_scale), softcap)
    # split() backpropagates through one SplitBackward (one concat), not one zero-padded copy per chunk.
    chunks = zip(flat_hidden.split(chunk_size), flat_labels.split(chunk_size))
    total = torch.zeros((), dtype=torch.float32, device=flat_hidden.device)
    for hidden_chunk, label_chunk in chunks:
        if torch.is_grad_enabled():
            part = checkpoint(_chunk_cross_entropy, hidden_chunk, label_chunk, *args, use_reentrant=False)
        else:
            part = _chunk_cross_entropy(hidden_chunk, label_chunk, *args)
        total = total + part
    return total, (flat_labels != ignore_index).sum()


def lm_head_spec(model: nn.Module) -> dict[str, Any]:
    """What the model applies to ``lm_head`` output, as keyword arguments of ``chunked_causal_lm_loss``.

    Read from the (text) config: ``logit_scale`` (Cohere: multiply), ``logits_scaling`` (Granite: divide;
    see ``registry.LOGITS_SCALING_MULTIPLIES``), ``lm_head_multiplier`` (Falcon-H1) and
    ``output_multiplier`` (multiply, before the cap), ``final_logit_softcapping`` (Gemma-style
    ``cap * tanh(x / cap)``). Returns ``{"logit_scale": float, "softcap": float | None}``.
    """
    config = model.config.get_text_config()
    scale = 1.0
    if getattr(config, "logit_scale", None) is not None:
        scale *= float(config.logit_scale)
    if getattr(config, "logits_scaling", None) is not None:
        value = float(config.logits_scaling)
        scale *= value if config.model_type in LOGITS_SCALING_MULTIPLIES else 1.0 / value
    for key in ("lm_head_multiplier", "output_multiplier"):
        if getattr(config, key, None) is not None:
            scale *= float(getattr(config, key))
    softcap = getattr(config, "final_logit_softcapping", None)
    return {"logit_scale": scale, "softcap": float(softcap) if softcap else None}
