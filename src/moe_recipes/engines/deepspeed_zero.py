"""DeepSpeed as the sharding engine: its JSON config built from ours, the optimizer, and initialisation.

Mixed precision is done by autocast inside the objective, so DeepSpeed keeps fp32 parameters (the master
weights), fp32 gradients and fp32 gradient accumulation; checkpoints therefore hold exact fp32 weights.

Under ZeRO-3 with bf16 compute, the weights that autocast casts to bf16 anyway (every matrix but the input
embedding: attention, routers, experts, shared experts, LM head) are all-gathered in bf16 (`gather_in_bf16`),
half the bytes of the fp32 gather. Each rank rounds its fp32 partition to bf16 before sending, which is the
rounding autocast would apply to the gathered fp32 weight, so the step computes exactly what it computed
with the fp32 gather; the gathered copy is widened back to fp32 in memory, gradients stay fp32 and are
reduced in `distributed.reduce_dtype`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moe_recipes.config import Config
from moe_recipes.engines.optim import build_optimizer
from moe_recipes.models.sharded_load import FillReport, fill_from_folder


def deepspeed_config(cfg: Config, dp_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON for this run; keys of `distributed.deepspeed_config` override ours."""
    t, d = cfg.train, cfg.distributed
    grad_accum = gradient_accumulation_steps(cfg, dp_size)
    zero: dict[str, Any] = {"stage": d.zero_stage}
    if d.zero_stage in (1, 2):
        zero.update({"overlap_comm": False, "contiguous_gradients": True, "reduce_scatter": True})
    if d.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if d.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    ds: dict[str, Any] = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "communication_data_type": "bf16" if d.reduce_dtype == "bf16" else "fp32",
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
    }
    if d.deepspeed_config:
        user = json.loads(Path(d.deepspeed_config).read_text())
        _deep_update(ds, user)
    return ds


def gradient_accumulation_steps(cfg: Config, dp_size: int) -> int:
    t = cfg.train
    per_step = t.micro_batch_size * dp_size
    if t.global_batch_size % per_step:
        raise ValueError(
            f"train.global_batch_size={t.global_batch_size} is not a multiple of train.micro_batch_size="
            f"{t.micro_batch_size} x {dp_size} data-parallel ranks"
        )
    return t.global_batch_size // per_step


def _deep_update(base: dict[str, Any], extra: dict[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value


def gathered_in_bf16(module: nn.Module, embedding: nn.Module | None) -> list[nn.Parameter]:
    """The parameters that only ever meet bf16 autocast's matmuls: every matrix (2-D and the 3-D fused
    experts) but the input embedding's (looked up, not multiplied, and kept fp32 by autocast), and no bias.
    Under ZeRO-3 a parameter's data is its 1-D partition; its real shape is `ds_shape`."""
    skip = {id(p) for p in embedding.parameters()} if embedding is not None else set()
    return [
        p
        for name, p in module.named_parameters()
        if len(getattr(p, "ds_shape", p.shape)) >= 2 and id(p) not in skip and not name.endswith("bias")
    ]


def gather_in_bf16(params: list[nn.Parameter]) -> None:
    """Have ZeRO-3 all-gather `params` in bf16: DeepSpeed's per-parameter communication dtype (the attribute
    its `torch_autocast` mode sets on the weights of the modules it casts), set without turning that mode on,
    so gradients keep `communication_data_type` (ours: fp32 unless distributed.reduce_dtype=bf16)."""
    from deepspeed.runtime.torch_autocast import PARAM_COMM_DTYPE_ATTR_NAME

    for p in params:
        setattr(p, PARAM_COMM_DTYPE_ATTR_NAME, torch.bfloat16)


def initialize(
    module: nn.Module,
    cfg: Config,
    ds_config: dict[str, Any],
    leaf_classes: set[type],
    embedding: nn.Module | None = None,
):
    """Wrap `module` in a DeepSpeed engine with a SkippableAdamW; returns (engine, optimizer). Under
    ZeRO-3 and bf16 compute, the matrices but `embedding`'s are gathered in bf16 (see the module's doc)."""
    import deepspeed
    from deepspeed.utils import set_z3_leaf_modules

    if cfg.distributed.zero_stage == 3 and leaf_classes:
        # Experts that get no tokens on one rank must not leave the others waiting for a gather.
        set_z3_leaf_modules(module, list(leaf_classes))
    if cfg.distributed.zero_stage == 3 and cfg.train.precision == "bf16":
        gather_in_bf16(gathered_in_bf16(module, embedding))
    o = cfg.optim
    optimizer = build_optimizer(module, o)
    engine, ds_optimizer, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config)
    return engine, optimizer


def set_lr(engine: Any, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def partition_and_fill(model: nn.Module, ds_config: dict[str, Any], weights: str | Path) -> FillReport:
    """ZeRO-3's partitioned start: partition the ``meta`` `model` (`partition_on_meta`), then read each
    parameter's partition, and only that, from the Hugging Face folder `weights`."""
    partition_on_meta(model, ds_config)
    return fill_from_folder(model, weights)


def partition_on_meta(model: nn.Module, ds_config: dict[str, Any]) -> None:
    """Make every parameter of the ``meta`` `model` a ZeRO-3 parameter that holds only this rank's partition
    (allocated, not yet filled), and materialise its buffers; as ``deepspeed.zero.Init`` would leave it, without
    building, initialising or broadcasting any whole tensor. `sharded_load.fill_from_folder` fills it next.

    ``zero.Init`` (like transformers' ``from_pretrained`` under it) creates each module's whole tensors, has rank
    0 broadcast them and only then keeps each rank's slice. Here DeepSpeed's own conversion
    (``Init._convert_to_deepspeed_param``: ids, shapes, process group, gather/partition methods) is applied to
    a stand-in of the full shape that owns one element, the partition is allocated as
    ``Init._partition_param`` allocates it (rank r holds elements ``[r*P, (r+1)*P)`` of the flattened tensor
    padded to ``world*P``, ``P = aligned_size / world``) and ``param.partition()`` frees the stand-in.
    `deepspeed.initialize` then finds ZeRO-3 parameters and uses them as they are.
    """
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import PartitionedParamStatus

    init = deepspeed.zero.Init(config_dict_or_path=ds_config)  # not entered: its methods convert parameters
    for name in ("_convert_to_deepspeed_param", "local_device", "remote_device", "dtype"):
        if not hasattr(init, name):
            raise RuntimeError(
                f"the partitioned ZeRO-3 start relies on deepspeed.zero.Init.{name}, which DeepSpeed "
                f"{deepspeed.__version__} does not have (written for 0.19)"
            )
    converted: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for key, meta in list(module._parameters.items()):
            if meta is None:
                continue
            if id(meta) not in converted:  # tied parameters are one parameter
                converted[id(meta)] = _zero3_param(init, meta, PartitionedParamStatus.AVAILABLE)
            module._parameters[key] = converted[id(meta)]
    buffers: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for key, buf in list(module._buffers.items()):
            if buf is not None and buf.is_meta:
                if id(buf) not in buffers:
                    buffers[id(buf)] = torch.empty_like(buf, device=init.local_device)
                module._buffers[key] = buffers[id(buf)]


def _zero3_param(init: Any, meta: nn.Parameter, available: Any) -> nn.Parameter:
    """One ZeRO-3 parameter of `meta`'s shape and dtype holding an empty partition of this rank."""
    if meta.dtype != init.dtype and meta.is_floating_point():
        raise ValueError(f"a {meta.dtype} parameter under a DeepSpeed config for {init.dtype} parameters")
    stand_in = torch.empty((), dtype=meta.dtype, device=init.local_device).expand(meta.shape)
    param = nn.Parameter(stand_in, requires_grad=meta.requires_grad)
    init._convert_to_deepspeed_param(param)
    world = param.ds_zero_partition_world_size
    size = param.aligned_size() // world
    # where Init._partition_param puts it: persistent (small, kept gathered) parameters on the compute device
    part = torch.empty(
        size, dtype=param.dtype, device=init.local_device if param.ds_persist else init.remote_device
    )
    if init.pin_memory and not param.ds_persist:
        from deepspeed.accelerator import get_accelerator

        part = get_accelerator().pin_memory(part)
    part.requires_grad = False
    part.ds_numel = size
    part.status = available
    part.final_location = None
    param.ds_tensor = part
    param.ds_numel_aligned = size * world
    param.partition()  # the partition exists: this frees the stand-in and marks the parameter not available
    return param
