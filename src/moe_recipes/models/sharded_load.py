"""Start at real size: build the model on ``meta``, shard it, then read only this rank's part from the folder.

`load_model` (``from_pretrained``) materialises the whole model on every rank before an engine shards it: a
Mixtral-8x7B under FSDP2 would put 187 GB of fp32 weights on each rank first. Here instead:

1. `build_on_meta` builds the Hugging Face model class from the folder's config on the ``meta`` device (no
   memory, no initialisation cost), with the attention and experts kernels `load_model` would choose;
2. the engine cuts it as it is and allocates only this rank's part: FSDP2 (expert-parallel cut,
   ``fully_shard``, ``to_empty``), DeepSpeed expert parallelism (cut, ``to_empty``: `materialise_and_fill`)
   or ZeRO-3 (each parameter becomes a ZeRO-3 parameter holding only its flat partition:
   `engines.deepspeed_zero.partition_on_meta`);
3. `fill_from_folder` reads, for every parameter and persistent buffer, what this rank holds (`_part_held`: a
   DTensor's rows, an expert-parallel slice's rows, the file rows that cover a ZeRO-3 partition, or the
   whole tensor) from the safetensors files over their memory map (``get_slice``), through the released
   layout of `hf_layout.py` (per-expert file tensors become rows of the fused in-memory experts); folders in
   the in-memory layout (written by earlier versions) are read too;
4. what the folder lacks is initialised as ``from_pretrained`` initialises it: the model's own
   ``initialize_weights``, which leaves every loaded tensor alone (transformers' ``_is_hf_initialized``
   flags) and computes the non-persistent buffers (rotary ``inv_freq``).

`start_mode` says which of these the trainer uses. From a folder without safetensors (``.bin`` weights) FSDP2
builds and shards the same way, then rank 0 reads and sends each rank its rows (`scatter_load`); elsewhere it
falls back to `load_model` with a message. The parameters equal ``from_pretrained``'s bit for bit
(tested for every family, 1, 2 and 4 processes, FSDP2 with and without expert parallelism, ZeRO-3 and
DeepSpeed expert parallelism, bf16 and fp32 files).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from moe_recipes.distributed.expert_parallel import EP_FIRST_EXPERT, EP_GLOBAL_SHAPE
from moe_recipes.hf_layout import FileTensor, released_layout
from moe_recipes.models.loading import _check_attention, _check_folder, _model_class_supports_experts_choice

MAP_WINDOW = 64 * 2**20  # bytes read between two drops of the memory maps (`_Files`)


def has_safetensors(folder: str | Path) -> bool:
    """Whether the Hugging Face folder holds safetensors weights (one file, or an index of shards)."""
    folder = Path(folder)
    return (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()


def whole_load_reason(cfg: Any, safetensors: bool, ds_config: dict[str, Any] | None = None) -> str | None:
    """Why training would load the whole model on every rank instead of building it on meta and reading only
    each rank's part (None when it reads only its part, or for DeepSpeed ZeRO 0-2 without expert
    parallelism, which replicate the model by design and always load it whole).

    FSDP2: CPU offload; ZeRO-3: a DeepSpeed JSON under which a partition is not plain fp32 (`ds_config`, or
    None for the keys of `distributed.deepspeed_config`, the only place those settings come from); every
    engine: weights that are not safetensors. Pure (but for reading that JSON), so `plan` asks it too."""
    d = cfg.distributed
    if d.engine == "fsdp2" and d.fsdp_cpu_offload:
        return "distributed.fsdp_cpu_offload"
    if d.engine == "deepspeed" and d.expert_parallel_size == 1:
        if d.zero_stage != 3:
            return None
        if ds_config is None:
            ds_config = json.loads(Path(d.deepspeed_config).read_text()) if d.deepspeed_config else {}
        if (why := _zero3_obstacle(ds_config)) is not None:
            return why
    if not safetensors:
        return f"{cfg.model.path} holds no safetensors weights"
    return None


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


def _zero3_obstacle(ds_config: dict[str, Any]) -> str | None:
    """Why a ZeRO-3 run cannot start partitioned from the files (None: it can). Those DeepSpeed settings
    change what a partition holds (half-precision parameters, NVMe-swapped, secondary or quantized copies)."""
    zero = ds_config.get("zero_optimization", {})
    for key in ("bf16", "fp16"):
        if ds_config.get(key, {}).get("enabled"):
            return f"the DeepSpeed config enables {key}: its parameters are not fp32"
    if (zero.get("offload_param") or {}).get("device") == "nvme":
        return "zero_optimization.offload_param.device=nvme"
    if zero.get("zero_hpz_partition_size", 1) > 1:
        return "zero_optimization.zero_hpz_partition_size > 1"
    for key in ("zero_quantized_weights", "zero_quantized_nontrainable_weights"):
        if zero.get(key):
            return f"zero_optimization.{key}"
    return None


def materialise(module: nn.Module, device: torch.device | str) -> None:
    """`to_empty` on `device`, keeping the expert-parallel marks of the parameters (`to_empty` replaces meta
    parameters with new ones)."""
    marks = {
        name: {k: getattr(p, k) for k in (EP_FIRST_EXPERT, EP_GLOBAL_SHAPE) if hasattr(p, k)}
        for name, p in module.named_parameters()
    }
    module.to_empty(device=device)
    for name, p in module.named_parameters():
        for key, value in marks[name].items():
            setattr(p, key, value)


def materialise_and_fill(
    module: nn.Module, model: nn.Module, folder: str | Path, device: torch.device
) -> FillReport:
    """Allocate `module`'s parts (sharded, cut: whatever it holds now) on `device` and fill them from `folder`;
    `model` is the Hugging Face model inside it. Safetensors are read by rows on every rank
    (`fill_from_folder`); ``.bin`` weights are read by rank 0 alone and sent (`scatter_load`)."""
    materialise(module, device)
    if not has_safetensors(folder):  # .bin weights: not readable by rows, rank 0 reads and sends them
        from moe_recipes.models.scatter_load import scatter_from_rank0

        return scatter_from_rank0(model, folder)
    return fill_from_folder(model, folder)


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


@dataclass
class _Part:
    """What this rank holds of one tensor of global `shape`: rows ``start : start + local.shape[0]`` (dim 0) of
    it, or, with `flat`, elements ``start : start + local.numel()`` of the flattened tensor (ZeRO-3's
    partition: the tail beyond the tensor's end is padding)."""

    local: torch.Tensor
    start: int
    shape: tuple[int, ...]
    flat: bool = False


def _part_held(tensor: torch.Tensor) -> _Part:
    """Where this rank's part of `tensor` lies: a ZeRO-3 partition, a DTensor sharded along dim 0, a DeepSpeed
    expert-parallel slice, or the whole tensor."""
    if getattr(tensor, "ds_tensor", None) is not None:  # ZeRO-3: rank r holds flat elements [r*P, (r+1)*P)
        part = tensor.ds_tensor
        rank = dist.get_rank(group=tensor.ds_process_group)
        return _Part(part, rank * part.ds_numel, tuple(tensor.ds_shape), flat=True)
    if hasattr(tensor, EP_FIRST_EXPERT):  # cut by shard_experts, a plain tensor
        return _Part(tensor.data, getattr(tensor, EP_FIRST_EXPERT), tuple(getattr(tensor, EP_GLOBAL_SHAPE)))
    if not isinstance(tensor, DTensor):
        return _Part(tensor.data, 0, tuple(tensor.shape))
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local = tensor.to_local()
    shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    if tuple(local.shape) != tuple(shape) or any(offset[1:]) or tuple(shape[1:]) != tuple(tensor.shape[1:]):
        raise ValueError(
            f"a parameter of shape {tuple(tensor.shape)} is sharded as {tensor.placements}: only sharding "
            "along the first dimension can be read directly"
        )
    return _Part(local, offset[0], tuple(tensor.shape))


class _Files:
    """Open safetensors files, one handle each, reading slices over the memory map.

    The touched pages of a memory map count as this process's memory for as long as it is mapped, so after
    every `window` bytes read the handles are dropped (a tensor read keeps its own pages alive until it is
    freed): the files add at most about `window` to the peak instead of all the bytes this rank reads."""

    def __init__(self, files: dict[str, Path], window: int = MAP_WINDOW):
        self.files = files
        self.window = window
        self._handles: dict[Path, Any] = {}
        self._since_release = 0

    def read(self, name: str, index: tuple[slice, ...]) -> torch.Tensor:
        from safetensors import safe_open

        if self._since_release >= self.window:
            self.close()
        path = self.files[name]
        if path not in self._handles:
            self._handles[path] = safe_open(str(path), "pt")
        value = self._handles[path].get_slice(name)[index]
        self._since_release += value.numel() * value.element_size()
        return value

    def close(self) -> None:
        """Drop the handles and their memory maps."""
        self._handles.clear()
        self._since_release = 0


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
    """Fill `model`'s materialised parameters and buffers from the Hugging Face `folder`, reading only the part
    this rank holds of each (`_part_held`); then initialise what the folder lacks, as from_pretrained does.

    `model` is the Hugging Face model (possibly FSDP2-sharded, expert-parallel cut or ZeRO-3 partitioned), not
    a wrapper.
    """
    folder = Path(folder)
    files = _Files(_weight_files(folder))
    read, filled, missing = 0, 0, []
    for name, tensor, part, released in tensors_to_fill(model):
        pieces = _pieces_in_folder(name, released, part.shape, files.files)
        if pieces is None:
            missing.append(name)
            continue
        if part.flat:
            read += _read_flat(files, pieces, part)
        else:
            stop = part.start + (part.local.shape[0] if part.local.dim() else 1)
            read += _read_rows(files, pieces, part.local, part.start, stop)
        tensor._is_hf_initialized = True  # transformers' init functions leave it alone
        filled += 1
    files.close()
    _initialise_the_rest(model)
    return FillReport(filled, read, missing)


def tensors_to_fill(model: nn.Module) -> list[tuple[str, torch.Tensor, _Part, tuple[FileTensor, ...]]]:
    """(name, tensor, this rank's part, its released file tensors) for each parameter and persistent buffer of
    `model`, tied ones once, in state-dict order: the same list on every rank (the readers of a folder share
    it: `fill_from_folder` here, `scatter_load.scatter_from_rank0` where rank 0 reads for everyone)."""
    unique: dict[int, tuple[str, torch.Tensor]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        unique.setdefault(id(tensor), (name, tensor))
    held = {name: _part_held(tensor) for name, tensor in unique.values()}
    layout = released_layout(model, [(name, part.shape) for name, part in held.items()])
    return [(name, tensor, held[name], layout.pieces[name]) for name, tensor in unique.values()]


def _read_rows(
    files: _Files, pieces: tuple[FileTensor, ...], local: torch.Tensor, start: int, stop: int
) -> int:
    """Copy rows ``start:stop`` of the in-memory tensor, read from its file tensors, into `local` (which holds
    just those rows; a 0-dim tensor holds its one value). Returns the bytes read."""
    read = 0
    for piece in pieces:
        hit = piece.rows(start, stop) if local.dim() else ((), ())
        if hit is None:
            continue
        file_index, dest = hit
        value = files.read(piece.name, file_index)
        read += value.numel() * value.element_size()
        if local.dim():
            piece.put(local, value, dest)  # copy_ converts the file's dtype: no second copy of the rows
        else:
            local.copy_(value)
    return read


def _read_flat(files: _Files, pieces: tuple[FileTensor, ...], part: _Part) -> int:
    """Fill a flat partition (elements ``part.start`` on of the flattened tensor) from the rows that cover it:
    whole rows straight into the partition, the partial rows at its two ends through a one-row buffer; the
    padding past the tensor's end is zeroed. Returns the bytes read."""
    shape = part.shape or (1,)
    row = math.prod(shape[1:])
    flat = part.local
    lo, hi = part.start, min(part.start + flat.numel(), math.prod(shape))
    flat[max(hi - lo, 0) :].zero_()
    if lo >= hi:
        return 0
    whole_lo, whole_hi = -(-lo // row), hi // row  # the rows inside [lo, hi)
    read = 0
    if whole_lo < whole_hi:
        rows = flat[whole_lo * row - lo : whole_hi * row - lo].view(whole_hi - whole_lo, *shape[1:])
        read += _read_rows(files, pieces, rows if part.shape else rows.view(()), whole_lo, whole_hi)
    for r in sorted({lo // row, (hi - 1) // row} - set(range(whole_lo, whole_hi))):
        buffer = flat.new_empty((1, *shape[1:]))
        read += _read_rows(files, pieces, buffer, r, r + 1)
        a, b = max(lo, r * row), min(hi, (r + 1) * row)
        flat[a - lo : b - lo] = buffer.view(-1)[a - r * row : b - r * row]
    return read


def _initialise_the_rest(model: nn.Module) -> None:
    """Run the model's own initialisation for what was not loaded (non-persistent buffers such as rotary
    ``inv_freq``, tensors the folder lacks); loaded tensors carry ``_is_hf_initialized`` and are skipped.

    ZeRO-3 parameters the folder lacks are gathered around it and rank 0's values kept, as transformers'
    ``_initialize_missing_keys`` does under ZeRO-3 (a no-op when the folder holds them all)."""
    hf_model = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    if hf_model is None:
        raise ValueError(f"{type(model).__name__} holds no Hugging Face model to initialise")
    for module in hf_model.modules():
        module._is_hf_initialized = False  # set when the meta model was built; its values are gone
    uninitialised = [
        p
        for p in hf_model.parameters()
        if hasattr(p, "ds_id") and not getattr(p, "_is_hf_initialized", False)
    ]
    if not uninitialised:
        hf_model.initialize_weights()
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(uninitialised, modifier_rank=0):
        hf_model.initialize_weights()
