"""Export a Hugging Face folder from a live DeepSpeed engine during training (`checkpoint.save_hf`).

`export_hf` is collective: every rank calls it. Tensors are taken one at a time in the HF model's own
order; under ZeRO-3 each parameter is all-gathered (`deepspeed.zero.GatheredParameters`), under ZeRO 0-2
every rank already holds it (expert-parallel experts are gathered from their EP group). Rank 0 copies each
tensor to the CPU in the output dtype and writes a shard as soon as it is full, so memory stays near one
shard; the folder is written like `convert` writes it (see `hf_folder.py`) into a temporary sibling of
`out_dir` and renamed into place.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from moe_recipes.engines.deepspeed_ep import gather_expert_param, is_expert_param
from moe_recipes.hf_folder import (
    ModelLayout,
    TensorSpec,
    file_tensors,
    layout_of,
    load_hf_config,
    parse_size,
    plan_shards,
    publish,
    shard_name,
    shard_order,
    staging_dir,
    write_config_files,
    write_index,
    write_shard,
)


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def hf_model_of(engine: Any) -> nn.Module:
    """The Hugging Face model inside an engine (engine.module is the trainer's objective, whose `.model` it is)."""
    module = getattr(engine, "module", engine)
    model = getattr(module, "model", module)
    if not hasattr(model, "config"):
        raise ValueError(f"cannot find a Hugging Face model in {type(engine).__name__} (no .module.model)")
    return model


def _file_tensors(
    layout: ModelLayout, tensor: torch.Tensor, spec: TensorSpec, keep: bool
) -> dict[str, torch.Tensor]:
    """The released file tensors of the whole tensor as CPU copies in the output dtype on the writing rank
    (nothing elsewhere).

    A ZeRO-3 partitioned parameter (it has `ds_id`) or an FSDP2 DTensor shard is gathered from all ranks,
    so every rank must call this in the same order.
    """
    if isinstance(tensor, DTensor):  # FSDP2 shard: gathered from all ranks
        tensor = tensor.full_tensor()
    if is_expert_param(tensor):  # DeepSpeed expert parallelism: this rank's experts, gathered from its group
        tensor = gather_expert_param(tensor)  # type: ignore[assignment]
    if hasattr(tensor, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([tensor], modifier_rank=None):
            return file_tensors(layout, spec, tensor.data, "export") if keep else {}
    return file_tensors(layout, spec, tensor, "export") if keep else {}


def export_hf(
    engine: Any,
    cfg: Any,
    out_dir: Path,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | int = "2GB",
) -> None:
    """Write the engine's current weights as a Hugging Face folder at `out_dir` (collective, rank 0 writes).

    Config, generation config and tokenizer come from the base model folder `cfg.model.path`; the weights
    are the model's own state dict in `dtype` in the released layout (`hf_layout.py`: what `save_pretrained`
    writes; tied aliases dropped, persistent buffers kept). An existing
    `out_dir` is replaced once the new folder is complete.
    """
    out_dir = Path(out_dir)
    model_dir = Path(cfg.model.path)
    model = hf_model_of(engine)
    # The layout comes from the live model: a meta model built while the trainer holds an HfDeepSpeedConfig
    # would be initialised the ZeRO-3 way by transformers, which fails on the meta device.
    layout = layout_of(model, dtype)
    state = model.state_dict(keep_vars=True)
    writer = _rank() == 0
    shards = plan_shards(layout.specs, parse_size(max_shard_size))
    tmp = staging_dir(out_dir) if writer else None

    def produce(spec: TensorSpec) -> dict[str, torch.Tensor]:
        return _file_tensors(layout, state[spec.name], spec, writer)

    try:
        for i, shard in enumerate(shards):
            if (
                tmp is not None
            ):  # rank 0 writes tensor by tensor; the others join each gather in the same order
                write_shard(tmp / shard_name(i, len(shards)), layout, shard, produce)
            else:
                for spec in shard_order(layout, shard):
                    produce(spec)
        if tmp is not None:
            write_index(tmp, layout, shards)
            write_config_files(model_dir, tmp, load_hf_config(model_dir), dtype)
            publish(tmp, out_dir)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _barrier()
