"""Expert parallelism (EP) with the DeepSpeed engine, ZeRO stages 0, 1 and 2.

The model is the Hugging Face one, cut by our dispatch layer (`expert_parallel.shard_experts`, plain
parameters holding this rank's experts); DeepSpeed's AutoEP is not used (it replaces the MoE blocks with
its own modules). What DeepSpeed provides is its expert-parallel plumbing, driven through its documented
MoE conventions:

* groups: `deepspeed.utils.groups._create_expert_and_data_parallel(E)` with its default layout, EP groups
  of E consecutive ranks (ours) and expert-data-parallel groups of the ranks with the same place in their
  EP group (they hold the same experts). Both are checked here, not assumed.
* parameters: every expert parameter has `allreduce = False` and `group_name = "ep_size_E"`, and sits in
  an optimizer param group marked `moe` with that `name` (`engine.param_groups`).

DeepSpeed (0.19) only turns its MoE handling on when the model holds one of its own MoE layers
(`engine.has_moe_layers`); `ExpertParallelEngine` turns it on for ours. Then:

* gradients: ZeRO 1/2 divide every gradient by the world size W and reduce expert gradients over the
  expert-data-parallel group (W / E ranks); stage 0 does the same in `_reduce_expert_gradients`. The
  all-to-all's backward has already summed an expert's gradient over its EP group's tokens, so experts get
  exactly the average the dense parameters get (measured: EP=2 == EP=1, tests/train/test_expert_parallel).
* gradient norm: ZeRO 1/2 sum every partition's squares over all ranks, which counts each expert element
  once (its expert-data-parallel partitions times the E groups of different experts): the true norm. At
  stage 0 DeepSpeed's `clip_grad_norm_` averages the per-rank norms, which is wrong when ranks hold
  different experts; `clip_fp32_gradients` is replaced by the true global norm (`global_grad_norm`), which
  the trainer also reports.
* checkpoints: DeepSpeed writes per-expert files only for its own MoE layer class. Here the model-states
  file (`mp_rank_00_model_states.pt`, written by rank 0) holds the FULL expert tensors, gathered from the
  first EP group, so `convert` reads it like any ZeRO 0-2 checkpoint; a load cuts each rank's slice out of
  them again. Optimizer states: ZeRO 1/2 write every rank's partition (`zero_pp_rank_R_...`), stage 0
  writes one optimizer file per EP rank (`expp_rank_R_mp_rank_00_optim_states.pt`, DeepSpeed's MoE path).
  Resuming with the same processes and expert_parallel_size is DeepSpeed's own load; with others (ZeRO
  1/2), `train.reshard` gathers every expert's optimizer partitions into whole tensors and each rank takes
  its experts' slice. ZeRO-0 EP checkpoints resume only with their own layout.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from moe_recipes.config import Config
from moe_recipes.distributed.expert_parallel import (
    EP_GLOBAL_SHAPE,
    EPLayout,
    check_expert_parallel,
    shard_experts,
)
from moe_recipes.engines.grad_norm import clip_to, squared_sum
from moe_recipes.models.inspect import MoEInfo

# Set on every expert-parallel parameter (besides DeepSpeed's `allreduce` and `group_name`, and shard_experts'
# EP_GLOBAL_SHAPE, the shape of the whole tensor)
EP_GROUP = "ep_group"  # the EP process group its slices are spread over


def group_name(ep: int) -> str:
    """DeepSpeed's name of the EP groups of size `ep`."""
    return f"ep_size_{ep}"


def is_expert_param(p: torch.Tensor) -> bool:
    return hasattr(p, EP_GROUP)


def create_groups(ep: int) -> Any:
    """Create DeepSpeed's EP and expert-data-parallel groups of size `ep` and return this rank's EP group,
    after checking their ranks are ours: EP groups of `ep` consecutive ranks, expert-data-parallel groups
    of the ranks with the same place in their EP group."""
    from deepspeed.utils import groups

    name = group_name(ep)
    groups._create_expert_and_data_parallel(ep)
    rank, world = dist.get_rank(), dist.get_world_size()
    first = rank - rank % ep
    ep_ranks = list(groups._get_expert_parallel_group_ranks(name))
    edp_ranks = list(groups._get_expert_data_parallel_group_ranks(name))
    if ep_ranks != list(range(first, first + ep)) or edp_ranks != list(range(rank % ep, world, ep)):
        raise RuntimeError(
            f"DeepSpeed built EP group {ep_ranks} and expert-data-parallel group {edp_ranks} for rank {rank} "
            f"(expert_parallel_size={ep}, {world} processes); expected EP groups of consecutive ranks"
        )
    return groups._get_expert_parallel_group(name)


def mark_expert_params(modules: list[nn.Module], ep: int, group: Any) -> None:
    """DeepSpeed's MoE marks on the experts modules' parameters, plus the EP group."""
    for module in modules:
        for p in module.parameters(recurse=False):
            p.allreduce = False  # type: ignore[attr-defined]
            p.group_name = group_name(ep)  # type: ignore[attr-defined]
            setattr(p, EP_GROUP, group)


def gather_expert_param(p: torch.Tensor, dst: int | None = None) -> torch.Tensor | None:
    """The whole tensor of an expert-parallel parameter, concatenated from its EP group's slices.

    Collective over the EP group. With `dst` (a rank of the group, global numbering) only that rank gets it
    (None elsewhere); otherwise every rank does."""
    group = getattr(p, EP_GROUP)
    local = p.detach().contiguous()
    size = dist.get_world_size(group)
    if dst is None:
        parts = [torch.empty_like(local) for _ in range(size)]
        dist.all_gather(parts, local, group=group)
        return torch.cat(parts)
    mine = dist.get_rank() == dst
    parts = [torch.empty_like(local) for _ in range(size)] if mine else None
    dist.gather(local, parts, dst=dst, group=group)
    return torch.cat(parts) if parts is not None else None


@torch.no_grad()
def global_grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """The gradient norm of the whole model after the data-parallel reduction: dense gradients are the
    same on every rank, an expert's is the same on the ranks that hold it, so the squares of the expert
    gradients are summed over the EP group once (fp64, `engines.grad_norm`)."""
    experts = [p for p in params if is_expert_param(p)]
    dense = [p.grad for p in params if p.grad is not None and not is_expert_param(p)]
    device = params[0].device if params else "cpu"
    expert_squares = squared_sum((p.grad for p in experts if p.grad is not None), device)
    if experts:  # every rank of the group joins the sum, with gradients or not
        dist.all_reduce(expert_squares, group=getattr(experts[0], EP_GROUP))
    return (squared_sum(dense, device) + expert_squares).sqrt().float()


def _engine_class(ep: int, num_experts: int) -> type:
    from deepspeed.runtime.engine import DeepSpeedEngine

    for name in ("_configure_distributed_model", "_get_non_moe_state_dict", "load_module_state_dict"):
        if not callable(getattr(DeepSpeedEngine, name, None)):
            import deepspeed

            raise RuntimeError(
                f"distributed.expert_parallel_size > 1 with DeepSpeed relies on DeepSpeedEngine.{name}, which "
                f"DeepSpeed {deepspeed.__version__} does not have (written for 0.19)"
            )

    class ExpertParallelEngine(DeepSpeedEngine):
        """DeepSpeed's engine with its MoE handling on for our expert-parallel parameters (see the module
        docstring for what that changes)."""

        expert_parallel_size: int = ep
        _full_experts: dict[str, torch.Tensor] | None = None

        def _configure_distributed_model(self, model: nn.Module) -> None:
            super()._configure_distributed_model(model)
            # Read when DeepSpeed builds its optimizer, reduces gradients and saves/loads checkpoints
            self.has_moe_layers = True
            self.num_experts = [num_experts]

        def _expert_params(self) -> dict[str, nn.Parameter]:
            return {n: p for n, p in self.module.named_parameters() if is_expert_param(p)}

        def global_grad_norm(self) -> torch.Tensor:
            return global_grad_norm(list(self.module.parameters()))

        @torch.no_grad()
        def clip_fp32_gradients(self) -> None:
            """Stage 0: clip to the true global norm, as `clip_grad_norm_` does with one rank."""
            params = [p for p in self.module.parameters() if p.grad is not None]
            if not params:
                return
            clip_to([p.grad for p in params], global_grad_norm(params), self.gradient_clipping())

        def save_checkpoint(self, save_dir, tag=None, client_state=None, save_latest=True, **kwargs):  # type: ignore[override]
            # Rank 0 writes the model states: it gets the whole expert tensors from its EP group first.
            full = {}
            if dist.get_rank() < self.expert_parallel_size:
                for name, p in self._expert_params().items():
                    whole = gather_expert_param(p, dst=0)
                    if whole is not None:
                        full[name] = whole.cpu()
            self._full_experts = full
            try:
                return super().save_checkpoint(save_dir, tag, client_state or {}, save_latest, **kwargs)
            finally:
                self._full_experts = None

        def _get_non_moe_state_dict(self, full_state_dict: dict[str, Any]) -> dict[str, Any]:
            state = super()._get_non_moe_state_dict(full_state_dict)
            if self._full_experts is None:
                raise RuntimeError("expert-parallel model states saved without the gathered experts")
            missing = [n for n in self._expert_params() if n not in self._full_experts]
            if missing:
                raise RuntimeError(f"rank {dist.get_rank()} writes the model states without {missing[0]}")
            state.update(self._full_experts)
            return state

        def load_module_state_dict(self, checkpoint: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
            """Cut this rank's experts out of the whole tensors of the model states."""
            module = dict(checkpoint["module"])
            for name, p in self._expert_params().items():
                whole = module.get(name)
                expected = tuple(getattr(p, EP_GLOBAL_SHAPE))
                if whole is None or tuple(whole.shape) != expected:
                    found = None if whole is None else tuple(whole.shape)
                    raise ValueError(
                        f"the checkpoint's {name} has shape {found}; expected the whole tensor {expected}"
                    )
                lo = (dist.get_rank() % self.expert_parallel_size) * p.shape[0]
                module[name] = whole[lo : lo + p.shape[0]]
            return super().load_module_state_dict({**checkpoint, "module": module}, *args, **kwargs)

    return ExpertParallelEngine


@contextlib.contextmanager
def _deepspeed_engine_class(cls: type) -> Iterator[None]:
    """`deepspeed.initialize` builds `deepspeed.DeepSpeedEngine`; make that `cls` while it runs."""
    import deepspeed

    original = deepspeed.DeepSpeedEngine
    deepspeed.DeepSpeedEngine = cls
    try:
        yield
    finally:
        deepspeed.DeepSpeedEngine = original


def check_deepspeed_config(cfg: Config, ds_config: dict[str, Any] | None = None) -> None:
    """The DeepSpeed JSON (ours with `distributed.deepspeed_config` on top) keeps what expert parallelism
    was verified with: ZeRO stage 0-2 with reduce-scatter (DeepSpeed's MoE gradient path), no optimizer
    offload, fp32 parameters. ValueError naming the values otherwise. Without `ds_config` it is built for
    one rank (preflight, before the rendezvous): the keys read here do not depend on the number of ranks."""
    if ds_config is None:
        from moe_recipes.engines.deepspeed_zero import deepspeed_config

        ds_config = deepspeed_config(cfg, 1)
    ep = cfg.distributed.expert_parallel_size
    zero = ds_config.get("zero_optimization", {})
    where = f"the DeepSpeed config (distributed.deepspeed_config={cfg.distributed.deepspeed_config})"
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2):
        raise ValueError(
            f"distributed.expert_parallel_size={ep} needs ZeRO stage 0, 1 or 2; {where} sets stage {stage}"
        )
    if stage > 0 and not zero.get("reduce_scatter", True):
        raise ValueError(
            f"distributed.expert_parallel_size={ep} needs zero_optimization.reduce_scatter; {where} turns it off"
        )
    if zero.get("offload_optimizer"):
        raise ValueError(
            f"distributed.expert_parallel_size={ep} cannot be combined with optimizer offload ({where})"
        )
    for key in ("bf16", "fp16"):
        if ds_config.get(key, {}).get("enabled"):
            raise ValueError(
                f"distributed.expert_parallel_size={ep} needs DeepSpeed's fp32 parameters (train.precision does "
                f"the mixed precision); {where} enables {key}"
            )


def initialize_expert_parallel(
    module: nn.Module,
    cfg: Config,
    ds_config: dict[str, Any],
    info: MoEInfo,
    weights: str | None = None,
    device: torch.device | None = None,
) -> tuple[Any, Any]:
    """Cut the experts of the model `info` describes over EP groups, mark them for DeepSpeed and wrap
    `module` (the trainer's objective) in the expert-parallel DeepSpeed engine; returns (engine, optimizer).

    With `weights` (a Hugging Face folder) the module is on the ``meta`` device: after the cut each rank
    materialises its experts and the replicated rest on `device` and reads only those rows from the folder
    (`models.sharded_load`)."""
    import deepspeed

    from moe_recipes.engines.optim import build_optimizer
    from moe_recipes.models.sharded_load import materialise_and_fill

    ep = cfg.distributed.expert_parallel_size
    world = dist.get_world_size() if dist.is_initialized() else 1
    check_expert_parallel(ep, world, info.num_experts)
    check_deepspeed_config(cfg, ds_config)
    group = create_groups(ep)
    layout = EPLayout(ep, dist.get_rank() % ep, info.num_experts)
    modules = shard_experts(info, layout, group)
    if weights is not None:
        materialise_and_fill(module, getattr(module, "model", module), weights, device or torch.device("cpu"))
    mark_expert_params(modules, ep, group)  # after materialising: to_empty makes new parameters
    if not any(p.requires_grad for m in modules for p in m.parameters(recurse=False)):
        # DeepSpeed's MoE handling needs an optimizer group of expert parameters
        raise ValueError(
            f"distributed.expert_parallel_size={ep} with DeepSpeed needs trainable routed experts, but "
            "moe.freeze / moe.freeze_patterns froze all of them; use distributed.engine=fsdp2 or "
            "expert_parallel_size=1"
        )
    optimizer = build_optimizer(module, cfg.optim)
    with _deepspeed_engine_class(_engine_class(ep, info.num_experts)):
        engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config)
    return engine, optimizer
