"""Expert parallelism (EP): each rank holds a slice of every MoE layer's routed experts, and tokens travel
to the rank that holds their expert and back with two all-to-alls (dispatch and combine).

``distributed.expert_parallel_size: E`` splits the W ranks into W / E groups of E consecutive ranks (an
"EP group"); inside a group rank ``r`` holds experts ``[r % E * n, (r % E + 1) * n)`` with ``n =
num_experts / E``, and the groups are data-parallel replicas of each other (EP borrows its ranks from data
parallelism, as in torchtitan and Megatron-Core: every rank still reads its own micro-batches).

Nothing of the Hugging Face model changes but the experts module's forward and the size of its fused
parameters (``gate_up_proj``, ``down_proj`` ... cut on the expert dimension): module and parameter names,
the router and its hooks, shared experts and every balancing loss stay as transformers builds them. The
local experts are computed by the model's own experts implementation (``grouped_mm`` or ``eager``) on the
tokens the rank received, each with routing weight 1; the routing weights are applied on the rank the token
came from after the combine, so their gradient never travels.

One forward of an EP layer (T tokens on this rank, top-k slots each, S = T * k)::

    order = sort(expert of each slot)                      # (S,) slots grouped by expert, hence by rank
    counts (E_all,) -> all-to-all -> received counts       # how many slots each rank sends each local expert
    x[order // k] (S, H) -> all-to-all -> (N, H)           # dispatch
    experts(local rows, local expert id, weight 1) (N, H)
    (N, H) -> all-to-all (splits reversed) -> (S, H)       # combine
    out = sum_k(weights * rows[inverse order])  (T, H)

The all-to-alls are autograd functions whose backward is the reverse all-to-all, so the gradient of an
expert on rank r sums the contributions of every token in its EP group. Data-parallel averaging then has
to divide expert gradients by the world size W (not by the W / E replicas that reduce them), so that
expert and dense parameters get the same averaging: the engines do that (FSDP2:
``set_gradient_divide_factor``; DeepSpeed: its MoE parameter groups, see ``deepspeed_ep``).
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from moe_recipes.models.inspect import MoEInfo

# Marks on an expert parameter cut to a plain tensor (not a DTensor, which knows its place itself): the
# whole tensor's shape (all experts) and the first expert this rank holds, read by checkpoints and loaders
EP_GLOBAL_SHAPE = "ep_global_shape"
EP_FIRST_EXPERT = "ep_first_expert"


@dataclass(frozen=True)
class EPLayout:
    """Where this rank sits: ``size`` ranks per EP group, this rank's place in it, the experts it holds."""

    size: int
    rank: int
    num_experts: int

    @property
    def local_experts(self) -> int:
        return self.num_experts // self.size

    @property
    def first_expert(self) -> int:
        return self.rank * self.local_experts


def check_expert_parallel(ep: int, world_size: int, num_experts: int, where: str = "") -> None:
    """Raise ValueError naming the values when ``ep`` cannot split ``num_experts`` over ``world_size`` ranks."""
    key = "distributed.expert_parallel_size"
    if ep < 1:
        raise ValueError(f"{key} must be >= 1, got {ep}")
    if ep == 1:
        return
    if world_size % ep:
        raise ValueError(f"{key}={ep} does not divide the {world_size} processes")
    if num_experts == 0:
        raise ValueError(f"{key}={ep}, but the model{where} has no MoE layers (no routers found)")
    if num_experts % ep:
        raise ValueError(f"{key}={ep} does not divide the model's {num_experts} routed experts{where}")


class _AllToAll(torch.autograd.Function):
    """Uneven all-to-all of rows; the backward sends the gradients back the way the rows came."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, out_splits: list[int], in_splits: list[int], group: Any) -> Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        out_splits, in_splits = ctx.splits
        back = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None


def all_to_all(x: Tensor, out_splits: list[int], in_splits: list[int], group: Any) -> Tensor:
    """Rows ``x`` (sum(in_splits), ...) sent in chunks ``in_splits`` to the group's ranks; returns the
    (sum(out_splits), ...) rows received, differentiable."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


class _LocalView:
    """The experts module as its implementation function sees it, with this rank's local weights.

    FSDP2 hands the forward DTensor parameters (sharded on the expert dimension over the EP group); the
    experts implementation computes with plain tensors, so parameters are read through ``to_local()``
    (differentiable). ``num_experts`` is the local count.
    """

    def __init__(self, module: nn.Module, num_local: int) -> None:
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "num_experts", num_local)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._module, name)
        return value.to_local() if isinstance(value, DTensor) else value


def _expert_forward(
    module: nn.Module,
    implementation: Callable[..., Tensor],
    layout: EPLayout,
    group: Any,
    hidden_states: Tensor,  # (T, H)
    top_k_index: Tensor,  # (T, k) global expert ids
    top_k_weights: Tensor,  # (T, k)
) -> Tensor:
    tokens, top_k = top_k_index.shape
    experts_all, local = layout.num_experts, layout.local_experts
    flat = top_k_index.reshape(-1)  # (S,)
    order = torch.argsort(flat, stable=True)  # (S,) slots grouped by expert, hence by destination rank
    send_counts = torch.bincount(flat, minlength=experts_all)  # (E_all,)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)  # (E_all,) as (ranks, local experts)
    # The split sizes must be known on the host: one small copy per layer, as in every all-to-all EP.
    sizes = torch.stack(
        [send_counts.view(layout.size, local).sum(1), recv_counts.view(layout.size, local).sum(1)]
    )
    in_splits, out_splits = sizes.tolist()
    received = all_to_all(hidden_states[order // top_k], out_splits, in_splits, group)  # (N, H)
    local_ids = torch.arange(local, device=flat.device).repeat(layout.size)  # expert of each received chunk
    local_ids = local_ids.repeat_interleave(recv_counts, output_size=received.shape[0])  # (N,), no sync
    view = _LocalView(module, local)
    if received.shape[0]:
        ones = torch.ones(received.shape[0], 1, dtype=top_k_weights.dtype, device=received.device)
        computed = implementation(view, received, local_ids[:, None], ones)  # (N, H)
    else:  # nothing for this rank's experts: keep them in the graph so every rank's backward matches
        weights = [p for p in (getattr(view, n) for n, _ in module.named_parameters(recurse=False))]
        computed = received + sum(w.sum() for w in weights) * 0.0
    returned = all_to_all(computed.to(hidden_states.dtype), in_splits, out_splits, group)  # (S, H)
    rows = torch.empty_like(returned)
    rows[order] = returned  # back to (token, slot) order
    # Weights in their own dtype (fp32 routers promote bf16 rows) and the sum over k before the cast: what
    # the experts implementations do without EP
    weighted = rows.view(tokens, top_k, -1) * top_k_weights.unsqueeze(-1)  # (T, k, H)
    return weighted.sum(dim=1).to(hidden_states.dtype)


def _ep_forward(implementation: Callable[..., Tensor], layout: EPLayout, group: Any) -> Callable[..., Tensor]:
    """The experts module's forward under EP, with the argument names of transformers' experts."""

    def forward(self: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        return _expert_forward(self, implementation, layout, group, hidden_states, top_k_index, top_k_weights)

    return forward


def expert_modules(info: MoEInfo) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every routed-experts module: the modules of the MoE blocks that own the
    fused 3-D expert parameters."""
    found = []
    for block_name, block in info.moe_blocks:
        for name, module in block.named_modules():
            if any(p.dim() == 3 for p in module.parameters(recurse=False)):
                found.append((f"{block_name}.{name}" if name else block_name, module))
    return found


def shard_experts(
    info: MoEInfo,
    layout: EPLayout,
    group: Any,
    to_param: Callable[[Tensor], nn.Parameter] | None = None,
) -> list[nn.Module]:
    """Keep this rank's slice of every experts module's parameters and route its forward through EP.

    ``to_param`` turns the local slice into the parameter to store (FSDP2: a DTensor sharded over the EP
    mesh dimension); by default a plain ``nn.Parameter``, marked with its place (`EP_GLOBAL_SHAPE`,
    `EP_FIRST_EXPERT`). Works on ``meta`` models too (nothing is allocated then). Returns the experts modules.
    """
    modules = []
    lo, hi = layout.first_expert, layout.first_expert + layout.local_experts
    found = expert_modules(info)
    if not found:
        raise ValueError(
            "distributed.expert_parallel_size > 1 needs fused experts (3-D gate_up_proj/down_proj weights, as "
            f"transformers 5 builds them); the MoE blocks of this model ({sorted(c.__name__ for c in info.moe_block_classes)}) "
            "have none"
        )
    for name, module in found:
        # transformers' experts interface: forward(hidden_states, top_k_index, top_k_weights), set up by
        # its `use_experts_implementation` decorator, which also gives the class `_apply_gate`
        if not hasattr(type(module), "_apply_gate"):
            raise ValueError(
                f"distributed.expert_parallel_size > 1: {name} ({type(module).__name__}) does not use "
                "transformers' experts interface (forward(hidden_states, top_k_index, top_k_weights))"
            )
        for pname, param in list(module.named_parameters(recurse=False)):
            if param.shape[0] != layout.num_experts:
                raise ValueError(
                    f"{name}.{pname} has shape {tuple(param.shape)}; expected {layout.num_experts} experts "
                    "on its first dimension"
                )
            local = param.detach()[lo:hi].clone()
            if to_param is not None:
                new = to_param(local)
            else:
                new = nn.Parameter(local)
                setattr(new, EP_GLOBAL_SHAPE, torch.Size((layout.num_experts, *local.shape[1:])))
                setattr(new, EP_FIRST_EXPERT, lo)
            new.requires_grad_(param.requires_grad)
            setattr(module, pname, new)
        implementation = type(module).forward
        module.forward = types.MethodType(_ep_forward(implementation, layout, group), module)
        modules.append(module)
    return modules
