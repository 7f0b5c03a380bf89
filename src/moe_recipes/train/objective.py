"""The training objective as one module: decoder forward, fused LM-head loss and the MoE losses.

The sharding engine wraps this module, so one call runs everything that needs the model's parameters.
The LM head is applied chunk by chunk (`chunked_causal_lm_loss`) so the (tokens, vocab) logits of a large
vocabulary never exist at once; the router outputs are captured with hooks, so the MoE losses are computed
here and returned, never kept in globals.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from moe_recipes.models.balancing import BalanceCoefs, GlobalLoad, balancing_losses
from moe_recipes.models.fused_loss import fused_linear_cross_entropy
from moe_recipes.models.inspect import MoEInfo, RouterCapture
from moe_recipes.models.losses import chunked_causal_lm_loss, expert_counts, lm_head_spec
from moe_recipes.precision import autocast_every_matmul

IGNORE_INDEX = -100
CHUNK_LOGIT_BYTES = 256 * 2**20


def loss_chunk_tokens(configured: int | None, vocab_size: int) -> int:
    """Tokens per LM-head chunk: the configured number, or enough for ~256 MiB of fp32 logits (a multiple
    of 64). Smaller chunks keep the logits of a large vocabulary out of the peak memory at no speed cost
    on the matmuls, which stay (chunk x hidden) @ (hidden x vocab)."""
    if configured is not None:
        return configured
    return max(64, CHUNK_LOGIT_BYTES // (4 * vocab_size) // 64 * 64)


def token_mask(
    attention_mask: torch.Tensor | None, real_tokens: torch.Tensor | None = None
) -> torch.Tensor | None:
    """(batch * seq,) bool, true on real tokens: `real_tokens` (what packed batches carry, whose padded
    tails are not in any attention mask), else a 2D padding mask; None when the batch has no padding.
    Never asks the device whether the mask is all true (that would be a host sync per micro-batch)."""
    mask = real_tokens if real_tokens is not None else attention_mask
    if mask is None or mask.dim() != 2:
        return None
    return mask.reshape(-1) != 0


class CausalLMObjective(nn.Module):
    """Computes the loss parts of one micro-batch.

    Returns `lm_loss_sum` (summed token cross-entropy, differentiable), `tokens` (tokens with a label),
    `moe_loss` (the coefficient-weighted router losses of `models.balancing.balancing_losses`,
    differentiable; averaged over MoE layers), the detached `aux_loss`, `global_aux_loss`, `seq_aux_loss`
    and `z_loss`, and the per-layer `expert_counts`. The trainer divides
    `lm_loss_sum` by the token count of the whole global batch, so every token weighs the same however
    the global batch is split over ranks and micro-batches (and whatever the padding).
    """

    def __init__(
        self,
        model: nn.Module,
        info: MoEInfo,
        *,
        aux_coef: float,
        z_coef: float,
        chunk_size: int,
        bf16: bool,
        fused_head: bool = True,
        global_coef: float = 0.0,
        seq_coef: float = 0.0,
        loss_kernel: str = "auto",
        aux_loss_type: str = "hf",
    ):
        super().__init__()
        self.model = model
        self.info = info
        self.aux_coef = aux_coef
        self.z_coef = z_coef
        self.coefs = BalanceCoefs(aux_coef, global_coef, seq_coef, z_coef, aux_loss_type)
        # Set by the trainer before each step's differentiable forwards when coefs.global_batch > 0.
        self.global_load: GlobalLoad | None = None
        self.chunk_size = chunk_size
        head = model.get_output_embeddings()
        # The fused head reads the weight directly; ZeRO-3 only materialises it inside the module's own call.
        self.fused_head = fused_head and chunk_size > 0 and getattr(head, "bias", None) is None
        self.bf16 = bf16
        self.loss_kernel = loss_kernel  # softmax-gradient code of the fused head (models.fused_loss.KERNELS)
        self.head_spec = lm_head_spec(model)
        self.capture = RouterCapture(model, info) if info.routers else None

    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if not self.bf16:
            return contextlib.nullcontext()
        autocast_every_matmul(device.type)  # the routed experts' grouped_mm included
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        real_tokens: torch.Tensor | None = None,
        route_only: bool = False,
    ) -> dict[str, torch.Tensor]:
        """The loss parts; with `route_only` just the per-layer expert counts (decoder forward, no head).

        `real_tokens` (batch, seq), 1 on real input and 0 on padding, is what packed chat batches carry
        instead of a padding mask: the router statistics leave their padded tails out."""
        if self.capture is not None:
            self.capture.clear()
        with self._autocast(input_ids.device):
            out = self.model.get_decoder()(
                input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False
            )
            hidden = out.last_hidden_state  # (batch, seq, hidden)
            if not route_only:
                loss_sum, n_tokens = self._lm_loss(hidden, labels)
        captured = self.capture.layers() if self.capture is not None else []
        mask = token_mask(attention_mask, real_tokens)
        counts = expert_counts(captured, self.info.num_experts, mask) if captured else torch.zeros(0, 0)
        if route_only:
            return {"expert_counts": counts}
        parts = balancing_losses(captured, self.info, self.coefs, input_ids.shape[0], self.global_load, mask)
        return {
            "lm_loss_sum": loss_sum,
            "tokens": n_tokens.detach(),
            **{k: v.to(loss_sum.device) for k, v in parts.items()},
            "expert_counts": counts,
        }

    def _lm_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        head = self.model.get_output_embeddings()
        if self.fused_head:
            return fused_linear_cross_entropy(
                hidden,
                head.weight,
                labels,
                chunk_size=self.chunk_size,
                ignore_index=IGNORE_INDEX,
                kernel=self.loss_kernel,
                **self.head_spec,
            )
        if self.chunk_size > 0:
            return chunked_causal_lm_loss(
                hidden, head, labels, chunk_size=self.chunk_size, ignore_index=IGNORE_INDEX, **self.head_spec
            )
        logits = head(hidden).float()
        if self.head_spec.get("logit_scale", 1.0) != 1.0:
            logits = logits * self.head_spec["logit_scale"]
        if self.head_spec.get("softcap"):
            cap = self.head_spec["softcap"]
            logits = torch.tanh(logits / cap) * cap
        flat = labels.reshape(-1)
        loss_sum = F.cross_entropy(
            logits.reshape(flat.numel(), -1), flat, ignore_index=IGNORE_INDEX, reduction="sum"
        )
        return loss_sum, (flat != IGNORE_INDEX).sum()
