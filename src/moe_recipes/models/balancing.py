"""Load-balancing controls for MoE training: three auxiliary-loss variants and the aux-loss-free bias update.

All losses read what ``RouterCapture.layers()`` returns (per MoE layer: router logits ``(tokens, E)`` and
the experts the router selected ``(tokens, top_k)``):

* **micro-batch** (Switch Transformer): ``E * sum_i f_i * P_i`` with ``f`` (expert selections) and ``P``
  (mean router probability) of one micro-batch on one rank (``losses.switch_loss``). ``moe.aux_loss_type``
  says how layers and ``f`` are taken: ``hf`` (default) is HF's ``load_balancing_loss_func``, layers pooled,
  ``f`` per token (even routing gives ``top_k``), so a checkpoint's ``router_aux_loss_coef`` means what it
  meant in training; ``per_layer`` is the Switch/Megatron normalisation (``f`` = share of slots, even
  routing gives 1), averaged over layers, i.e. ``1 / top_k`` of ``hf`` for one layer.
* **global-batch** (Qiu et al. 2025, "Demons in the detail"): the same formula, with the same
  ``moe.aux_loss_type`` (so with one micro-batch on one rank it equals the micro-batch loss), but ``f``
  counts the whole global batch, i.e. every micro-batch of the optimizer step on every data-parallel
  rank. ``f`` carries no gradient, so it can be known *before* the differentiable forward: the trainer
  routes the step's micro-batches once without gradients (``CausalLMObjective(route_only=True)``),
  all-reduces the expert counts and hands them to the objective (``GlobalLoad``). Each micro-batch then
  contributes ``E / T_global * sum_i f_i * sum_{t in micro-batch} p_{t,i}`` (``T_global`` and the sums
  over all layers' tokens for ``hf``); summed over micro-batches and ranks this is exactly the loss of
  the global batch, value and gradient, however the global batch is split over ranks and accumulation
  steps (as long as the forward is deterministic: no dropout, and ties in the top-k broken the same way
  in both passes). The price is one extra no-grad forward per micro-batch. Megatron's cheaper running sum
  (``f`` from the micro-batches seen so far) is not exact across accumulation steps, which is why it is
  not used here.
* **per-sequence** (DeepSeek-V2/V3): for every sequence (row of the micro-batch) ``f_i = E / (K T) *
  count_i`` and ``P_i`` = mean over its tokens of the normalised router scores, loss ``sum_i f_i P_i``
  (even routing gives 1), averaged over the sequences and over the MoE layers. DeepSeek adds the
  per-layer losses up, so its ``aux_loss_alpha`` is ``seq_aux_loss_coef / (number of MoE layers)``:
  DeepSeek-V2-Lite's 0.001 over 26 MoE layers is ``moe.seq_aux_loss_coef: 0.026``.

Router scores are softmax probabilities, except for routers that carry an ``e_score_correction_bias``
(DeepSeek-V3-style sigmoid routing), whose scores are ``sigmoid(logits)`` normalised to sum to 1, as in
DeepSeek-V3's sequence-wise loss. The Switch and global-batch losses keep the softmax (the statistic they
are defined with).

The aux-loss-free method (DeepSeek-V3) updates ``e_score_correction_bias`` after every optimizer step:
``bias_i += rate * sign(mean_load - load_i)``, from the step's expert counts all-reduced over ranks, so
every rank applies the same update. The bias is a persistent buffer, so checkpoints and exported HF
folders carry it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from moe_recipes.models.inspect import MoEInfo
from moe_recipes.models.losses import AUX_LOSS_TYPES, router_z_loss, switch_loss, token_weights

BIAS_NAME = "e_score_correction_bias"


@dataclass(frozen=True)
class BalanceCoefs:
    """Coefficients of the router losses added to the LM loss (0 turns a term off), and the form of the
    Switch losses (micro-batch and global-batch): ``aux_loss_type`` "hf" or "per_layer"."""

    micro_batch: float = 0.0
    global_batch: float = 0.0
    sequence: float = 0.0
    z: float = 0.0
    aux_loss_type: str = "hf"

    def __post_init__(self) -> None:
        if self.aux_loss_type not in AUX_LOSS_TYPES:
            raise ValueError(
                f"aux_loss_type must be one of {', '.join(AUX_LOSS_TYPES)}, got {self.aux_loss_type!r}"
            )

    def total(self, parts: dict[str, float]) -> float:
        """The weighted sum of reported loss values (keys as returned by ``balancing_losses``)."""
        return (
            self.micro_batch * parts.get("aux_loss", 0.0)
            + self.global_batch * parts.get("global_aux_loss", 0.0)
            + self.sequence * parts.get("seq_aux_loss", 0.0)
            + self.z * parts.get("z_loss", 0.0)
        )


@dataclass
class GlobalLoad:
    """Expert counts of the whole global batch, known before its differentiable forwards.

    ``counts`` is ``(layers, E)`` routing slots summed over every micro-batch and rank; ``grad_scale`` is
    what the engine divides each micro-batch loss by (accumulation steps x data-parallel ranks), so the
    summed gradient is that of the global-batch loss.
    """

    counts: Tensor
    top_k: int
    grad_scale: float = 1.0

    @property
    def fraction(self) -> Tensor:
        """``f`` per layer ``(layers, E)``: share of the global batch's routing slots per expert."""
        counts = self.counts.double()
        return (counts / counts.sum(-1, keepdim=True).clamp_min(1.0)).float()

    @property
    def tokens(self) -> float:
        """Tokens the routers saw in the global batch (slots of one layer / top_k)."""
        return max(float(self.counts[0].sum()) / self.top_k, 1.0)


def router_scores(logits: Tensor, sigmoid: bool) -> Tensor:
    """Router scores ``(tokens, E)`` in fp32 that sum to 1 per token (softmax, or normalised sigmoid)."""
    if not sigmoid:
        return logits.float().softmax(dim=-1)
    scores = logits.float().sigmoid()
    return scores / scores.sum(dim=-1, keepdim=True).clamp_min(1e-20)


def global_batch_loss_part(
    logits: Tensor, fraction: Tensor, global_tokens: float, mask: Tensor | None = None
) -> Tensor:
    """This micro-batch's share of one layer's global-batch loss: ``E / T_global * sum_i f_i sum_t p_ti``.

    ``fraction`` (E,) is the layer's ``f`` over the global batch (no gradient); summing the parts of all
    micro-batches on all ranks gives ``E * sum_i f_i * P_i`` of the global batch. Masked tokens
    (``mask == 0``, padding) add nothing.
    """
    num_experts = logits.shape[-1]
    if fraction.shape != (num_experts,):
        raise ValueError(f"fraction must be ({num_experts},), got {tuple(fraction.shape)}")
    weights = token_weights(mask, logits.shape[0], logits.device)  # (tokens,)
    prob_sums = (logits.float().softmax(dim=-1) * weights[:, None]).sum(dim=0)  # (E,)
    return num_experts / global_tokens * (fraction.to(prob_sums.device) * prob_sums).sum()


def pooled_global_batch_loss_part(
    captured_logits: list[Tensor], counts: Tensor, global_tokens: float, mask: Tensor | None = None
) -> Tensor:
    """This micro-batch's share of the pooled (HF-form) global-batch loss over all layers.

    ``counts`` (layers, E) are the global batch's routing slots, ``global_tokens`` its tokens: ``f_i`` =
    selections of expert ``i`` per token over all layers (sums to ``top_k``), and the part is
    ``E / (L T_global) * sum_i f_i sum_{l, t} p_lti``; summed over micro-batches and ranks it is HF's
    ``load_balancing_loss_func`` with the global batch's ``f``.
    """
    layers, num_experts = counts.shape
    if len(captured_logits) != layers:
        raise ValueError(f"global counts cover {layers} layers, the router ran in {len(captured_logits)}")
    rows = layers * global_tokens
    fraction = (counts.double().sum(dim=0) / rows).float()  # (E,)
    prob_sums = None
    for logits in captured_logits:
        weights = token_weights(mask, logits.shape[0], logits.device)  # (tokens,)
        part = (logits.float().softmax(dim=-1) * weights[:, None]).sum(dim=0)  # (E,)
        prob_sums = part if prob_sums is None else prob_sums + part.to(prob_sums.device)
    return num_experts / rows * (fraction.to(prob_sums.device) * prob_sums).sum()


def sequence_loss(
    logits: Tensor, indices: Tensor, batch_size: int, sigmoid: bool = False, mask: Tensor | None = None
) -> Tensor:
    """DeepSeek-V2/V3 sequence-wise balance loss of one layer, averaged over the ``batch_size`` sequences.

    ``logits`` (batch * seq, E) and ``indices`` (batch * seq, top_k) are in row-major (batch, seq) order,
    as routers see the flattened hidden states. ``mask`` (batch * seq,), true on real tokens, leaves
    padding out: each sequence's ``f`` and ``P`` are over its own tokens, and sequences without any are
    not averaged.
    """
    tokens, num_experts = logits.shape
    top_k = indices.shape[-1]
    if tokens % batch_size or indices.shape[0] != tokens:
        raise ValueError(
            f"router saw {tokens} tokens and {indices.shape[0]} index rows; "
            f"cannot split them into {batch_size} sequences"
        )
    seq_len = tokens // batch_size
    keep = token_weights(mask, tokens, logits.device).view(batch_size, seq_len)  # (B, T)
    scores = router_scores(logits, sigmoid).view(batch_size, seq_len, num_experts)  # (B, T, E)
    counts = torch.zeros(batch_size, num_experts, dtype=torch.float32, device=logits.device)
    flat = indices.to(logits.device).view(batch_size, seq_len * top_k)  # (B, T*K)
    slot_keep = keep.repeat_interleave(top_k, dim=1)  # (B, T*K): the slots of real tokens
    counts.scatter_add_(1, flat, slot_keep)  # (B, E)
    lengths = keep.sum(dim=1)  # (B,)
    rows = lengths > 0
    f = counts * num_experts / (top_k * lengths.clamp(min=1))[:, None]  # (B, E), sums to E per sequence
    p = (scores * keep[..., None]).sum(dim=1) / lengths.clamp(min=1)[:, None]  # (B, E)
    per_sequence = (f * p).sum(dim=-1)
    # empty rows contribute 0; dividing by the non-empty count averages without a host sync
    return per_sequence.sum() / rows.sum().clamp_min(1)


def _uses_sigmoid(router: nn.Module) -> bool:
    return isinstance(getattr(router, BIAS_NAME, None), Tensor)


def balancing_losses(
    captured: list[tuple[Tensor, Tensor]],
    info: MoEInfo,
    coefs: BalanceCoefs,
    batch_size: int,
    global_load: GlobalLoad | None = None,
    mask: Tensor | None = None,
) -> dict[str, Tensor]:
    """The router losses of one micro-batch; ``mask`` (batch * seq,), true on real tokens, leaves padding
    out of all of them (the trainer passes it for padded chat batches).

    Returns ``moe_loss`` (differentiable: the coefficient-weighted sum, the global-batch part already
    multiplied by ``global_load.grad_scale``) and the detached values ``aux_loss`` (micro-batch),
    ``global_aux_loss`` (this micro-batch's additive share), ``seq_aux_loss`` and ``z_loss``. Terms with a
    zero coefficient are reported as 0 except the micro-batch loss and z-loss, which are cheap and logged.
    """
    if not captured:
        zero = torch.zeros(())
        return {k: zero for k in ("moe_loss", "aux_loss", "global_aux_loss", "seq_aux_loss", "z_loss")}
    n, k = info.num_experts, info.top_k
    layers = len(captured)
    aux = switch_loss(captured, n, k, mask, coefs.aux_loss_type)
    z = torch.stack([router_z_loss(lg, mask) for lg, _ in captured]).mean()
    zero = aux.new_zeros(())
    glob, seq = zero, zero
    if coefs.global_batch:
        if global_load is None or global_load.counts.shape != (layers, n):
            got = None if global_load is None else tuple(global_load.counts.shape)
            raise ValueError(f"global-batch loss needs the global expert counts ({layers}, {n}), got {got}")
        fraction, total = global_load.fraction, global_load.tokens
        if coefs.aux_loss_type == "hf":
            glob = pooled_global_batch_loss_part([lg for lg, _ in captured], global_load.counts, total, mask)
        else:
            glob = torch.stack(
                [global_batch_loss_part(lg, fraction[i], total, mask) for i, (lg, _) in enumerate(captured)]
            ).mean()
    if coefs.sequence:
        sig = [_uses_sigmoid(r) for _, r in info.routers] or [False]
        seq = torch.stack(
            [
                sequence_loss(lg, ix, batch_size, sig[i % len(sig)], mask)
                for i, (lg, ix) in enumerate(captured)
            ]
        ).mean()
    moe_loss = zero
    if coefs.micro_batch:
        moe_loss = moe_loss + coefs.micro_batch * aux
    if coefs.global_batch:
        moe_loss = moe_loss + coefs.global_batch * glob * (global_load.grad_scale if global_load else 1.0)
    if coefs.sequence:
        moe_loss = moe_loss + coefs.sequence * seq
    if coefs.z:
        moe_loss = moe_loss + coefs.z * z
    return {
        "moe_loss": moe_loss,
        "aux_loss": aux.detach(),
        "global_aux_loss": glob.detach(),
        "seq_aux_loss": seq.detach(),
        "z_loss": z.detach(),
    }


def bias_routers(info: MoEInfo) -> list[tuple[str, nn.Module]]:
    """The routers that carry an ``e_score_correction_bias`` buffer (aux-loss-free balancing)."""
    return [(name, r) for name, r in info.routers if _uses_sigmoid(r)]


@torch.no_grad()
def measure_global_load(
    route: Callable[[Any], Tensor],
    micro_batches: Iterable[Any],
    top_k: int,
    grad_scale: float,
    all_reduce: Callable[[Tensor], Tensor],
) -> GlobalLoad:
    """Route every micro-batch of the step without gradients and sum the expert counts over all ranks.

    ``route(batch)`` returns one micro-batch's ``(layers, E)`` counts (a no-grad decoder forward);
    ``all_reduce`` sums a tensor over the data-parallel ranks. The weights do not change before the
    differentiable forwards, so they route the same tokens the same way and the counts are exact.
    """
    total: Tensor | None = None
    for batch in micro_batches:
        counts = route(batch).double().cpu()
        total = counts if total is None else total + counts
    if total is None:
        raise ValueError("measure_global_load: the step has no micro-batches")
    return GlobalLoad(counts=all_reduce(total), top_k=top_k, grad_scale=grad_scale)


def check_bias_update(info: MoEInfo, rate: float) -> None:
    """Fail early when ``moe.bias_update_rate`` is set for a model whose routers have no bias buffer."""
    if rate and not bias_routers(info):
        raise ValueError(
            f"moe.bias_update_rate={rate} needs routers with an {BIAS_NAME} buffer (DeepSeek-V3-style); "
            f"this model's router class {getattr(info.router_class, '__name__', None)} has none"
        )


@torch.no_grad()
def update_routing_bias(info: MoEInfo, counts: Tensor, rate: float) -> int:
    """DeepSeek-V3's aux-loss-free update: ``bias_i += rate * sign(mean_load - load_i)`` per MoE layer.

    ``counts`` is ``(layers, E)``: the step's routing slots per expert, all-reduced over the data-parallel
    ranks so that every rank computes the same update. Returns the number of routers updated; a model
    whose routers have no such bias is an error (the setting would silently do nothing).
    """
    check_bias_update(info, rate or 1.0)
    routers = bias_routers(info)
    if counts.shape != (len(info.routers), info.num_experts):
        raise ValueError(
            f"expert counts have shape {tuple(counts.shape)}, expected ({len(info.routers)}, {info.num_experts})"
        )
    index = {id(r): i for i, (_, r) in enumerate(info.routers)}
    for _, router in routers:
        load = counts[index[id(router)]].double()  # (E,)
        bias = getattr(router, BIAS_NAME)
        step = torch.sign(load.mean() - load) * rate
        bias.add_(step.to(device=bias.device, dtype=bias.dtype))
    return len(routers)
