"""Start at real size: build the model on ``meta``, shard it, then read only this rank's rows from the folder.

`load_model` (``from_pretrained``) materialises the whole model on every rank before an engine shards it: a
Mixtral-8x7B under FSDP2 would put 187 GB of fp32 weights on each rank first. Here instead:

1. `build_on_meta` builds the Hugging Face model class from the folder's config on the ``meta`` device (no
   memory, no initialisation cost), with the attention and experts kernels `load_model` would choose;
2. the engine shards it as it is (expert-parallel cut, ``fully_shard``) and calls ``to_empty``, so each rank
   allocates only its own shards;
3. `fill_from_folder` reads, for every parameter and persistent buffer, the rows this rank holds (a DTensor's
   offset and local shape, or the whole tensor) from the safetensors files over their memory map
   (``get_slice``), through the released layout of `hf_layout.py` (per-expert file tensors become rows of
   the fused in-memory experts); folders in the in-memory layout (written by earlier versions) are read too;
4. what the folder lacks is initialised as ``from_pretrained`` initialises it: the model's own
   ``initialize_weights``, which leaves every loaded tensor alone (transformers' ``_is_hf_initialized``
   flags) and computes the non-persistent buffers (rotary ``inv_freq``).

The parameters equal ``from_pretrained``'s bit for bit (tested for every family, 1, 2 and 4 processes, with
and without expert parallelism, bf16 and fp32 files).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from moe_recipes.hf_layout import FileTensor, released_layout
from moe_recipes.models.loading import _check_attention, _check_folder, _model_class_supports_experts_choice


def has_safetensors(folder: str | Path) -> bool:
    """Whether the Hugging Face folder holds safetensors weights (one file, or an index of shards)."""
    folder = Path(folder)
    return (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()


def whole_load_reason(cfg: Any, safetensors: bool) -> str | None:
    """Why FSDP2 training would load the whole model on every rank instead of starting sharded (None when it
    starts sharded): CPU offload, or weights that are not safetensors. Pure, so `plan` asks it too."""
    if cfg.distributed.fsdp_cpu_offload:
        return "distributed.fsdp_cpu_offload"
    if not safetensors:
        return f"{cfg.model.path} holds no safetensors weights"
    return None


def starts_sharded(cfg: Any) -> bool:
    """Whether training builds the model on meta and reads only each rank's shards: FSDP2 (with or without
    expert parallelism) from a safetensors folder, without CPU offload. Otherwise every rank loads the whole
    model first (DeepSpeed, which replicates or partitions it itself), with a message where FSDP2 could not."""
    if cfg.distributed.engine != "fsdp2":
        return False
    why = whole_load_reason(cfg, has_safetensors(cfg.model.path))
    if why is not None:
        print(f"[moe-recipes] loading the whole model on every rank before sharding ({why})", flush=True)
        return False
    return True


def build_on_meta(
    path: str, *, attn_implementation: str = "sdpa", experts_implementation: str = "grouped_mm"
) -> PreTrainedModel:
    """The model class of the folder at `path`, in fp32 on the ``meta`` device, with `load_model`'s kernels."""
    folder = Path(path)
    _check_folder(folder)
    _check_attention(attn_implementation)
    config = AutoConfig.from_pretrained(str(folder))
    kwargs: dict[str, Any] = {"attn_implementation": attn_implementation, "dtype": torch.float32}
    if _model_class_supports_experts_choice(config):
        kwargs["experts_implementation"] = experts_implementation
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    return model.eval()  # as from_pretrained returns it; the trainer switches to train mode


@dataclass
class FillReport:
    """What `fill_from_folder` did on this rank."""

    tensors: int  # tensors of the model filled from the folder
    bytes_read: int  # bytes of tensor data this rank read
    initialised: list[str]  # names the folder lacks, initialised as from_pretrained would


def _weight_files(folder: Path) -> dict[str, Path]:
    """File tensor name -> the safetensors file that holds it (an index, or a single model.safetensors)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(
            f"{folder} holds no safetensors weights (model.safetensors or model.safetensors.index.json); "
            "sharded start-up reads safetensors only"
        )
    from safetensors import safe_open

    with safe_open(str(single), "pt") as f:
        return dict.fromkeys(f.keys(), single)


def _rows_held(tensor: torch.Tensor) -> tuple[torch.Tensor, int, tuple[int, ...]]:
    """(the local tensor, the first global row it holds, the global shape); only row-sharded tensors."""
    if not isinstance(tensor, DTensor):
        return tensor.data, 0, tuple(tensor.shape)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local = tensor.to_local()
    shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    if tuple(local.shape) != tuple(shape) or any(offset[1:]) or tuple(shape[1:]) != tuple(tensor.shape[1:]):
        raise ValueError(
            f"a parameter of shape {tuple(tensor.shape)} is sharded as {tensor.placements}: only sharding "
            "along the first dimension can be read directly"
        )
    return local, offset[0], tuple(tensor.shape)


class _Files:
    """Open safetensors files, one handle each, reading slices over the memory map."""

    def __init__(self, files: dict[str, Path]):
        self.files = files
        self._handles: dict[Path, Any] = {}

    def read(self, name: str, index: tuple[slice, ...]) -> torch.Tensor:
        from safetensors import safe_open

        path = self.files[name]
        if path not in self._handles:
            self._handles[path] = safe_open(str(path), "pt")
        return self._handles[path].get_slice(name)[index]


def _pieces_in_folder(
    name: str, pieces: tuple[FileTensor, ...], shape: tuple[int, ...], files: dict[str, Path]
) -> tuple[FileTensor, ...] | None:
    """The file tensors to read `name` from: the released ones, or the in-memory name itself (folders
    written in transformers 5's in-memory layout), or None when the folder holds neither."""
    if all(f.name in files for f in pieces):
        return pieces
    if name in files:
        return (FileTensor.whole(name, shape),)
    return None


@torch.no_grad()
def fill_from_folder(model: nn.Module, folder: str | Path) -> FillReport:
    """Fill `model`'s materialised (``to_empty``) parameters and buffers from the Hugging Face `folder`,
    reading only the rows this rank holds; then initialise what the folder lacks, as from_pretrained does.

    `model` is the Hugging Face model (possibly FSDP2-sharded and expert-parallel cut), not a wrapper.
    """
    folder = Path(folder)
    files = _Files(_weight_files(folder))
    unique: dict[int, tuple[str, torch.Tensor]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        unique.setdefault(id(tensor), (name, tensor))
    held = {name: _rows_held(tensor) for name, tensor in unique.values()}
    layout = released_layout(model, [(name, shape) for name, (_, _, shape) in held.items()])
    read, filled, missing = 0, 0, []
    for name, tensor in unique.values():
        local, start, shape = held[name]
        pieces = _pieces_in_folder(name, layout.pieces[name], shape, files.files)
        if pieces is None:
            missing.append(name)
            continue
        stop = start + (local.shape[0] if local.dim() else 1)
        for piece in pieces:
            hit = piece.rows(start, stop) if local.dim() else ((), ())
            if hit is None:
                continue
            file_index, dest = hit
            value = files.read(piece.name, file_index)
            read += value.numel() * value.element_size()
            if local.dim():
                piece.put(local, value.to(local.dtype), dest)
            else:
                local.copy_(value)
        tensor._is_hf_initialized = True  # transformers' init functions leave it alone
        filled += 1
    _initialise_the_rest(model)
    return FillReport(filled, read, missing)


def _initialise_the_rest(model: nn.Module) -> None:
    """Run the model's own initialisation for what was not loaded (non-persistent buffers such as rotary
    ``inv_freq``, tensors the folder lacks); loaded tensors carry ``_is_hf_initialized`` and are skipped."""
    hf_model = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    if hf_model is None:
        raise ValueError(f"{type(model).__name__} holds no Hugging Face model to initialise")
    for module in hf_model.modules():
        module._is_hf_initialized = False  # set when the meta model was built; its values are gone
    hf_model.initialize_weights()
