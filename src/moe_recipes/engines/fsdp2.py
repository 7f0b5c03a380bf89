"""PyTorch FSDP2 as the sharding engine, behind the same small surface the trainer uses from DeepSpeed.

`fully_shard` is applied per decoder layer, then to the root (the trainer's `CausalLMObjective`), on a 1D
device mesh (full sharding) or a 2D (replicate, shard) mesh (hybrid sharding: shard inside groups of
`distributed.fsdp_shard_size` ranks, replicate across groups). Parameters stay fp32 (the master weights);
with `train.precision=bf16` FSDP2 gathers them in bf16 for compute and reduces gradients in fp32.

Gradient semantics are DeepSpeed's: `backward(loss)` back-propagates `loss / accumulation steps`, and
FSDP2 averages gradients over the data-parallel ranks; `step()` is called after every micro-batch and
updates (clip, optimizer step, zero grad) only at the accumulation boundary. By default every micro-batch's
backward reduce-scatters its gradients and the sharded gradients accumulate (as torchtitan does), so a rank
never holds more than its shard of the gradients plus one layer's unsharded ones. With
`distributed.fsdp_defer_grad_sync` only the boundary's backward reduces (`set_requires_gradient_sync`):
one reduction per step, but every rank keeps unsharded fp32 gradients of the whole model until then
(~187 GB for Mixtral-8x7B), so that is for small models only. Both give the same losses. With hybrid
sharding the all-reduce across replicas runs once per step either way (`set_requires_all_reduce`).

Checkpoints are written with `torch.distributed.checkpoint` (DCP): every rank writes its shards of the
model and optimizer state into one folder with a `.metadata` file, and a load with any number of
processes reshards them. Model keys are `model.<objective key>`, i.e. `model.model.<HF key>`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

from moe_recipes.config import Config
from moe_recipes.distributed.expert_parallel import EPLayout, check_expert_parallel, shard_experts
from moe_recipes.engines.grad_norm import clip_to, squared_sum
from moe_recipes.engines.optim import SkippableAdamW, build_optimizer
from moe_recipes.models.inspect import MoEInfo

ENGINE_NAME = "fsdp2"


def build_mesh(device_type: str, world_size: int, shard_size: int | None) -> DeviceMesh:
    """1D mesh over all ranks, or a 2D ("replicate", "shard") mesh for hybrid sharding."""
    if not shard_size or shard_size == world_size:
        return init_device_mesh(device_type, (world_size,), mesh_dim_names=("shard",))
    if world_size % shard_size:
        raise ValueError(
            f"distributed.fsdp_shard_size={shard_size} does not divide the {world_size} processes"
        )
    return init_device_mesh(
        device_type, (world_size // shard_size, shard_size), mesh_dim_names=("replicate", "shard")
    )


def build_expert_mesh(device_type: str, world_size: int, ep: int) -> DeviceMesh:
    """The (W / ep, ep) mesh ("efsdp", "ep") of the routed experts: EP groups of `ep` consecutive ranks
    (the inner dimension, so an all-to-all stays inside a node when `ep` <= GPUs per node), and the experts
    fully sharded across the groups."""
    return init_device_mesh(device_type, (world_size // ep, ep), mesh_dim_names=("efsdp", "ep"))


def shard_experts_over_mesh(info: MoEInfo, expert_mesh: DeviceMesh) -> list[nn.Module]:
    """Cut every experts module down to this rank's experts, as DTensors sharded on the expert dimension
    over the mesh's "ep" dimension (so checkpoints keep the global shapes), and route its forward through
    the all-to-all dispatch."""
    ep_mesh = expert_mesh["ep"]
    layout = EPLayout(ep_mesh.size(), ep_mesh.get_local_rank(), info.num_experts)

    def to_param(local: torch.Tensor) -> nn.Parameter:
        return nn.Parameter(DTensor.from_local(local, ep_mesh, [Shard(0)], run_check=False))

    return shard_experts(info, layout, ep_mesh.get_group(), to_param)


def shard_model(
    objective: nn.Module,
    cfg: Config,
    decoder_layer_classes: set[type],
    mesh: DeviceMesh,
    experts: tuple[list[nn.Module], DeviceMesh] | None = None,
) -> None:
    """`fully_shard` every decoder layer, then the root, with the configured precision and offload.

    With expert parallelism (`experts` = the EP experts modules and their mesh) each experts module is
    sharded first, over the mesh's "efsdp" dimension, and its gradients are divided by the world size:
    the all-to-all's backward has already summed them over the EP group, so that gives the same average
    as the dense parameters get."""
    d = cfg.distributed
    bf16 = cfg.train.precision == "bf16"
    reduce_dtype = torch.bfloat16 if d.reduce_dtype == "bf16" else torch.float32
    mp = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=reduce_dtype if bf16 else None
    )
    offload: OffloadPolicy = (
        CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if d.fsdp_cpu_offload else OffloadPolicy()
    )
    kwargs: dict[str, Any] = {"mesh": mesh, "mp_policy": mp, "offload_policy": offload}
    if experts is not None:
        modules, expert_mesh = experts
        for module in modules:
            fully_shard(
                module,
                reshard_after_forward=d.fsdp_reshard_after_forward,
                **{**kwargs, "mesh": expert_mesh["efsdp"]},
            )
            module.set_gradient_divide_factor(float(mesh.size()))
            # gloo has no PREMUL_SUM: reduce with SUM and divide apart. Not on a one-rank group, where
            # FSDP2 divides once more by the factor itself (the gradient would come out W times too small).
            efsdp = expert_mesh.get_group("efsdp")
            if dist.get_backend(efsdp) == "gloo" and efsdp.size() > 1:
                module.set_force_sum_reduction_for_comms(True)
    layers = [m for m in objective.modules() if type(m) in decoder_layer_classes]
    if not layers:
        names = sorted(c.__name__ for c in decoder_layer_classes)
        raise ValueError(f"distributed.engine=fsdp2: found no decoder layers (looked for {names})")
    for layer in layers:
        fully_shard(layer, reshard_after_forward=d.fsdp_reshard_after_forward, **kwargs)
    fully_shard(objective, reshard_after_forward=False, **kwargs)  # the root is needed again at once


@torch.no_grad()
def clip_sharded_grads(params: list[torch.Tensor], max_norm: float, replicas: int = 1) -> torch.Tensor:
    """The global gradient norm of sharded parameters on any meshes, clipped to `max_norm` as
    `clip_grad_norm_` does (same coefficient).

    Every element of a parameter lives on exactly `replicas` ranks (1 when fully sharded, the replica
    groups with hybrid sharding; experts included, whose EP and FSDP shards partition them), so the squared
    norm is the sum of the local shards' squares over all ranks / `replicas`, whatever mesh each parameter
    is on (summed in fp64, see `engines.grad_norm`).
    """
    grads = [g.to_local() if isinstance(g, DTensor) else g for g in (p.grad for p in params)]
    total = squared_sum(grads)
    if dist.is_initialized() and dist.get_world_size() > 1:
        if total.device.type == "cpu" and dist.get_backend() == "nccl":  # CPU-offloaded gradients
            total = total.cuda()
        dist.all_reduce(total)
    norm = (total / replicas).sqrt()
    clip_to(grads, norm, max_norm)
    return norm.float()


class FSDPEngine:
    """The FSDP2-sharded objective with its optimizer, driven like a DeepSpeed engine by the trainer."""

    engine_name = ENGINE_NAME

    def __init__(
        self,
        module: nn.Module,
        optimizer: SkippableAdamW,
        grad_accum: int,
        grad_clip: float,
        defer_grad_sync: bool = False,
        replicas: int = 1,
    ):
        self.module = module
        self.optimizer = optimizer
        self.grad_accum = grad_accum
        self.grad_clip = grad_clip
        self.defer_grad_sync = defer_grad_sync  # reduce only on the boundary micro-batch
        self.replicas = replicas  # ranks that hold each gradient element (hybrid sharding: > 1)
        self.micro_steps = 0  # micro-batches finished (step() calls) since the start of this process
        self._grad_norm: torch.Tensor | float | None = None

    def __call__(self, **batch: Any) -> dict[str, torch.Tensor]:
        return self.module(**batch)

    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()

    @property
    def at_boundary(self) -> bool:
        """True while the current micro-batch is the last of its optimizer step."""
        return (self.micro_steps + 1) % self.grad_accum == 0

    def backward(self, loss: torch.Tensor) -> None:
        """Back-propagate `loss / accumulation steps`. Gradients are reduce-scattered on every micro-batch,
        or with `defer_grad_sync` kept unsharded and reduced only on the boundary micro-batch."""
        boundary = self.at_boundary
        self.module.set_requires_gradient_sync(boundary or not self.defer_grad_sync)
        # Hybrid sharding: reduce-scatter inside the shard group every micro-batch (sharded gradients), but
        # all-reduce across the replicas only once per step (no-op on a 1D mesh).
        self.module.set_requires_all_reduce(boundary)
        (loss / self.grad_accum).backward()

    def step(self) -> None:
        """End a micro-batch; at the accumulation boundary clip, update and zero the gradients."""
        boundary = self.at_boundary
        self.micro_steps += 1
        if not boundary:
            return
        self._grad_norm = self._clip()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _clip(self) -> torch.Tensor | float:
        """The global (pre-clipping) gradient norm over all ranks; clips to `grad_clip` when > 0.
        Returned as a tensor, so reading it (a host sync) is left to whoever logs it."""
        params = [p for p in self.module.parameters() if p.grad is not None]
        if not params:
            return 0.0
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        return clip_sharded_grads(params, max_norm, self.replicas)

    def get_global_grad_norm(self) -> torch.Tensor | float | None:
        return self._grad_norm

    def _state_dicts(self) -> dict[str, Any]:
        opts = StateDictOptions()
        return {
            "model": get_model_state_dict(self.module, options=opts),
            "optim": get_optimizer_state_dict(self.module, self.optimizer, options=opts),
        }

    def save_checkpoint(self, save_dir: str, tag: str, save_latest: bool = False) -> None:
        """Every rank writes its shards to `save_dir/tag` (collective). `save_latest` is the trainer's job."""
        dcp.save(self._state_dicts(), checkpoint_id=str(Path(save_dir) / tag))

    def load_checkpoint(
        self,
        load_dir: str,
        tag: str,
        load_optimizer_states: bool = True,
        load_lr_scheduler_states: bool = False,
    ) -> tuple[str, dict[str, Any]]:
        """Read `load_dir/tag` into this process's shards, whatever the world size that wrote it.

        DeepSpeed's signature; there is no LR scheduler state (the trainer computes the LR from the step).
        """
        path = Path(load_dir) / tag
        if not (path / ".metadata").is_file():
            raise FileNotFoundError(f"{path} holds no torch.distributed.checkpoint (.metadata missing)")
        state = self._state_dicts()
        if not load_optimizer_states:
            state.pop("optim")
        dcp.load(state, checkpoint_id=str(path))
        set_model_state_dict(self.module, state["model"])
        if "optim" in state:
            set_optimizer_state_dict(self.module, self.optimizer, state["optim"])
        return str(path), {}


def shard_and_fill(
    module: nn.Module,
    model: nn.Module,
    cfg: Config,
    info: MoEInfo,
    device: torch.device,
    weights: str | None = None,
) -> DeviceMesh:
    """Shard `module` (the Hugging Face `model`, or the objective around it) as training does: the experts
    cut over the expert mesh when `distributed.expert_parallel_size` > 1, then `fully_shard`; returns the
    mesh. With `weights` the module is on ``meta``: each rank then materialises only its shards and reads
    only their rows from that Hugging Face folder (`models.sharded_load`)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    d = cfg.distributed
    mesh = build_mesh(device.type, world, d.fsdp_shard_size)
    experts = None
    if d.expert_parallel_size > 1:
        check_expert_parallel(d.expert_parallel_size, world, info.num_experts)
        expert_mesh = build_expert_mesh(device.type, world, d.expert_parallel_size)
        experts = (shard_experts_over_mesh(info, expert_mesh), expert_mesh)
    shard_model(module, cfg, info.decoder_layer_classes, mesh, experts)
    if weights is not None:
        from moe_recipes.models.sharded_load import materialise_and_fill

        materialise_and_fill(module, model, weights, device)
    return mesh


def initialize_fsdp(
    module: nn.Module,
    cfg: Config,
    info: MoEInfo,
    grad_accum: int,
    device: torch.device,
    weights: str | None = None,
) -> tuple[FSDPEngine, SkippableAdamW]:
    """Shard `module` (the objective around the model `info` describes) with FSDP2, with expert
    parallelism when `distributed.expert_parallel_size` > 1, and build its SkippableAdamW.

    With `weights` (a Hugging Face folder) the module is on the ``meta`` device: after sharding, each rank
    materialises only its shards and reads only their rows from the folder (`models.sharded_load`)."""
    d = cfg.distributed
    mesh = shard_and_fill(module, getattr(module, "model", module), cfg, info, device, weights)
    # Built after sharding, so the optimizer holds (and keeps its state for) the DTensor shards.
    optimizer = build_optimizer(module, cfg.optim)
    engine = FSDPEngine(
        module,
        optimizer,
        grad_accum,
        cfg.train.grad_clip,
        d.fsdp_defer_grad_sync,
        replicas=mesh["replicate"].size() if mesh.ndim == 2 else 1,
    )
    return engine, optimizer
