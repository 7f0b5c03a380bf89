"""Writing a Hugging Face model folder: the weight layout, safetensors shards, config and tokenizer files.

Every way out of training (converting a checkpoint, converting a consolidated state dict, exporting from
a live engine) ends here, so the folders they write are identical:

* weights: the released layout, the tensors ``save_pretrained`` writes for the config's architecture (see
  ``hf_layout.py``: per-expert ``w1/w2/w3`` or ``gate_proj/up_proj/down_proj``, not transformers 5's fused
  in-memory ``experts.gate_up_proj``), persistent buffers included (e.g. DeepSeek-V3's
  ``e_score_correction_bias``), tied aliases left out (``lm_head.weight`` when the embeddings are tied), in
  ``model-0000i-of-0000n.safetensors`` shards plus ``model.safetensors.index.json``. Every reader of Hugging
  Face checkpoints (transformers 4.x and 5, vLLM, SGLang, llama.cpp's converter) reads this layout;
* ``config.json``: the base model's file byte for byte, except that its ``dtype`` field is rewritten when the
  weights are saved in another dtype (``from_pretrained`` reads it as the default dtype);
* ``generation_config.json`` (copied, or derived from the config when the base model has none) and the
  tokenizer files.

A folder is written into a temporary sibling and renamed into place when complete, so a crash never leaves a
half-written model at the output path.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moe_recipes.fileio import publish, staging_dir  # noqa: F401 - re-exported for convert
from moe_recipes.hf_layout import ReleasedLayout, released_layout
from moe_recipes.layout import HF_FILES

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}
CONFIG_DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float32: "float32",
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
}
INDEX_FILE = "model.safetensors.index.json"
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(size: str | int) -> int:
    """'2GB' -> 2_000_000_000 bytes (decimal units as in transformers; '2GiB' is binary); ints pass through."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = _SIZE_RE.match(str(size))
        if not match:
            raise ValueError(f"max shard size {size!r} should look like 2GB, 500MB or a number of bytes")
        value = int(float(match.group(1)) * _UNITS[(match.group(2) or "B").upper()])
    if value <= 0:
        raise ValueError(f"max shard size must be positive, got {size!r}")
    return value


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the model in memory: its name, whole shape and the dtype it is saved in."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass
class ModelLayout:
    """What the folder of one architecture holds: the in-memory tensors in model order, the file tensors each
    becomes (`released`), and the dropped tied aliases."""

    config: Any
    class_name: str
    specs: list[TensorSpec]
    tied: dict[str, str]  # alias left out -> the name it shares its storage with
    released: ReleasedLayout

    def describe(self) -> str:
        return f"{self.class_name} (model_type {self.config.model_type!r})"


def _keeps_fp32(name: str, patterns: Iterable[str]) -> bool:
    """Whether `name` lies in one of the modules a model keeps in fp32 (transformers' keep_in_fp32 rule)."""
    for pattern in patterns:
        if (
            name == pattern
            or name.startswith(pattern + ".")
            or name.endswith("." + pattern)
            or f".{pattern}." in name
        ):
            return True
    return False


def model_layout(config: Any, dtype: torch.dtype) -> ModelLayout:
    """The tensors `AutoModelForCausalLM.from_pretrained` expects for `config`, saved in `dtype`.

    Built from a model on the meta device (no memory); see `layout_of`.
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return layout_of(model, dtype)


def layout_of(model: Any, dtype: torch.dtype) -> ModelLayout:
    """The tensors of `model`'s own state dict as they are saved in `dtype`.

    Floating tensors take `dtype`, except those the model class keeps in fp32 when loaded in half precision
    (`_keep_in_fp32_modules_strict`, e.g. DeepSeek-V3's router weight and correction bias); integer buffers
    keep their dtype. A name whose tensor is the same object as an earlier one (tied embeddings) is recorded
    in `tied` and not saved: transformers re-ties it. ZeRO-3 partitioned parameters report their full
    shape (`ds_shape`), DeepSpeed expert-parallel slices theirs (`ep_global_shape`).
    """
    keep_fp32: set[str] = set()
    if dtype in (torch.float16, torch.bfloat16):
        keep_fp32 = set(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
        if dtype == torch.float16:
            keep_fp32 |= set(getattr(model, "_keep_in_fp32_modules", None) or [])
    specs, tied, seen = [], {}, {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            tied[name] = seen[id(tensor)]
            continue
        seen[id(tensor)] = name
        out = tensor.dtype
        if tensor.is_floating_point():
            out = torch.float32 if _keeps_fp32(name, keep_fp32) else dtype
        # ZeRO-3 partitions and DeepSpeed expert-parallel slices know the whole tensor's shape
        shape = getattr(tensor, "ds_shape", getattr(tensor, "ep_global_shape", tensor.shape))
        specs.append(TensorSpec(name, tuple(shape), out))
    released = released_layout(model, [(spec.name, spec.shape) for spec in specs])
    return ModelLayout(model.config, type(model).__name__, specs, tied, released)


def plan_shards(specs: list[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    """Group tensors, in order, into shards of at most `max_bytes` (a larger tensor gets a shard of its own)."""
    shards: list[list[TensorSpec]] = []
    size = 0
    for spec in specs:
        if not shards or (shards[-1] and size + spec.nbytes > max_bytes):
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def shard_name(index: int, count: int) -> str:
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def file_tensors(
    layout: ModelLayout, spec: TensorSpec, tensor: torch.Tensor, where: str
) -> dict[str, torch.Tensor]:
    """The released file tensors of the in-memory `tensor`: private CPU copies in the spec's dtype (never
    aliasing memory-mapped sources or each other, as safetensors requires)."""
    if tuple(tensor.shape) != spec.shape:
        raise ValueError(
            f"{where}: {spec.name} has shape {tuple(tensor.shape)}, the config expects {spec.shape}"
        )
    pieces = layout.released.split(spec.name, tensor.detach())
    return {name: t.to(device="cpu", dtype=spec.dtype, copy=True).contiguous() for name, t in pieces.items()}


_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def shard_order(layout: ModelLayout, shard: list[TensorSpec]) -> list[TensorSpec]:
    """The order a shard's tensors are written in: widest dtype first, so every tensor's bytes start at a
    multiple of its element size (as safetensors' own writer keeps them), otherwise model order."""
    return sorted(shard, key=lambda spec: -spec.dtype.itemsize)


def write_shard(
    path: Path,
    layout: ModelLayout,
    shard: list[TensorSpec],
    produce: Callable[[TensorSpec], dict[str, torch.Tensor]],
) -> None:
    """Write one safetensors file tensor by tensor: memory holds one in-memory tensor's file tensors, not
    the shard (whatever --max-shard-size is).

    The header is known before any value (names, dtypes and shapes come from the layout), so it is written
    first and each tensor's bytes follow in `shard_order`; `produce(spec)` gives the spec's file tensors.
    The file is what `safetensors.torch.save_file` writes for the same tensors, up to the order of the data.
    """
    order = shard_order(layout, shard)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in order:
        for f in layout.released.pieces[spec.name]:
            size = f.numel * spec.dtype.itemsize
            header[f.name] = {
                "dtype": _SAFETENSORS_DTYPES[spec.dtype],
                "shape": list(f.shape),
                "data_offsets": [offset, offset + size],
            }
            offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as out:
        out.write(len(raw).to_bytes(8, "little"))
        out.write(raw)
        for spec in order:
            tensors = produce(spec)
            for f in layout.released.pieces[spec.name]:
                t = tensors[f.name]
                if t.dtype != spec.dtype or tuple(t.shape) != f.shape:
                    raise ValueError(
                        f"{f.name}: got {t.dtype} {tuple(t.shape)}, expected {spec.dtype} {f.shape}"
                    )
                out.write(memoryview(t.contiguous().view(torch.uint8).reshape(-1).numpy()))
            del tensors
        if out.tell() != 8 + len(raw) + offset:
            raise AssertionError(
                f"{path}: wrote {out.tell()} bytes, the header describes {8 + len(raw) + offset}"
            )


def write_index(out_dir: Path, layout: ModelLayout, shards: list[list[TensorSpec]]) -> None:
    """`model.safetensors.index.json` (written even for one shard, so every folder has the same files)."""
    weight_map = {
        f.name: shard_name(i, len(shards))
        for i, shard in enumerate(shards)
        for spec in shard
        for f in layout.released.pieces[spec.name]
    }
    total = sum(spec.nbytes for shard in shards for spec in shard)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def write_weights(
    out_dir: Path,
    layout: ModelLayout,
    fetch: Callable[[TensorSpec], torch.Tensor],
    max_bytes: int,
    where: str,
    progress: bool = False,
) -> None:
    """Write all shards, one in-memory tensor at a time (`write_shard`): memory stays near the largest
    tensor's size, whatever the shard size.

    Shards are planned by in-memory tensor, so the file tensors of one in-memory tensor share a shard."""
    from tqdm import tqdm

    shards = plan_shards(layout.specs, max_bytes)
    for i, shard in enumerate(tqdm(shards, desc="writing shards", unit="shard", disable=not progress)):
        path = out_dir / shard_name(i, len(shards))
        write_shard(path, layout, shard, lambda spec: file_tensors(layout, spec, fetch(spec), where))
    write_index(out_dir, layout, shards)


def write_config_files(src_dir: Path, out_dir: Path, config: Any, dtype: torch.dtype) -> None:
    """config.json (only its dtype field changed when needed), generation config and tokenizer files."""
    raw = (src_dir / "config.json").read_text()
    if config_dtype(src_dir) != dtype:
        data = json.loads(raw)
        for key in [k for k in ("dtype", "torch_dtype") if k in data] or ["dtype"]:
            data[key] = CONFIG_DTYPE_NAMES[dtype]
        raw = json.dumps(data, indent=2, sort_keys=True) + "\n"
    (out_dir / "config.json").write_text(raw)
    copy_side_files(src_dir, out_dir, config)


def copy_side_files(src_dir: Path, out_dir: Path, config: Any) -> None:
    """The generation config (copied, or derived from `config`) and the tokenizer files of `src_dir`."""
    if (src_dir / "generation_config.json").is_file():
        shutil.copy2(src_dir / "generation_config.json", out_dir / "generation_config.json")
    else:
        from transformers import GenerationConfig

        GenerationConfig.from_model_config(config).save_pretrained(str(out_dir))
    for name in HF_FILES:
        if name not in ("config.json", "generation_config.json") and (src_dir / name).is_file():
            shutil.copy2(src_dir / name, out_dir / name)


def config_dtype(src_dir: Path) -> torch.dtype:
    """The dtype named in a config.json (`dtype`, or the older `torch_dtype`); fp32 when absent or unknown."""
    data = json.loads((src_dir / "config.json").read_text())
    name = str(data.get("dtype") or data.get("torch_dtype") or "float32").removeprefix("torch.")
    by_name = {v: k for k, v in CONFIG_DTYPE_NAMES.items()}
    return by_name.get(name, torch.float32)


def resolve_dtype(dtype: str | torch.dtype | None, src_dir: Path) -> torch.dtype:
    """None/'auto' -> the base config's dtype; 'fp32'/'bf16' or a torch dtype as given."""
    if dtype is None or dtype == "auto":
        return config_dtype(src_dir)
    if isinstance(dtype, torch.dtype):
        if dtype not in CONFIG_DTYPE_NAMES:
            raise ValueError(f"dtype {dtype} is not one of {sorted(CONFIG_DTYPE_NAMES.values())}")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def check_output(output: Path, overwrite: bool, protected: Iterable[Path] = ()) -> None:
    """Refuse an output that exists (unless `overwrite`) or that would replace one of the inputs."""
    out = output.resolve()
    for path in protected:
        src = path.resolve()
        if out == src or out in src.parents:
            raise ValueError(
                f"output folder {output} would replace the input {path}; choose another --output"
            )
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {output} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"output folder {output} already exists (pass --overwrite to replace it)")


def load_hf_config(hf_dir: Path) -> Any:
    """The AutoConfig of a folder; a missing or unreadable config.json is an error naming it."""
    from transformers import AutoConfig

    config_file = hf_dir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} does not exist (no Hugging Face config to convert with)")
    try:
        return AutoConfig.from_pretrained(str(hf_dir))
    except (ValueError, KeyError, OSError) as err:
        raise ValueError(f"cannot read {config_file}: {err}") from None
