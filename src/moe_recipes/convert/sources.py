"""Where converted weights come from: our checkpoint folders and consolidated state-dict files.

A checkpoint (see `train/checkpoint.py`) holds DeepSpeed's engine files, whose keys are the trainer's
module names (`model.<HF key>`, since the engine wraps `CausalLMObjective`). Where the full weights are:

* ZeRO 0-2: `mp_rank_00_model_states.pt` holds the complete module state; the engine keeps fp32
  parameters, so these are the exact master weights. It is memory-mapped, not read into memory. With
  expert parallelism too: the engine writes the whole expert tensors there (`engines.deepspeed_ep`).
* ZeRO-3: every rank's file holds only its slice of the fp32 master weights. DeepSpeed's
  `zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(lazy_mode=True)` memory-maps the per-rank
  partitions and returns one lazy tensor per parameter, gathered only when asked for
  (`.contiguous()`), so conversion holds one output shard at a time, not the whole model.

* FSDP2 (`distributed.engine=fsdp2`): a `torch.distributed.checkpoint` folder (`.metadata` + one
  `.distcp` file per rank) of fp32 shards; `dcp_checkpoint_source` reads the tensor shapes from the metadata
  and loads one full tensor at a time (DCP assembles it from every rank's shards) when it is asked for.

Consolidated state dicts (the output of DeepSpeed's `zero_to_fp32.py`, or any torch/safetensors state dict,
sharded with an index or not) are read lazily too: safetensors by key, torch files memory-mapped.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moe_recipes.layout import resolve_checkpoint, verify_checkpoint

MODEL_STATES = "mp_rank_00_model_states.pt"
RANK_MODEL_STATES = "zero_pp_rank_{rank}_mp_rank_00_model_states.pt"
RANK_OPTIM_STATES = "zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"  # a `bf16_` prefix may precede it
_RANK_FILE_RE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_\d+_(?:model|optim)_states\.pt$")
STATE_DICT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
STATE_DICT_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pt")


class TensorSource:
    """Named tensors whose shapes are known up front and whose values are read on demand.

    Values may be tensors or lazy tensors (anything with `.shape` and `.contiguous()`, like DeepSpeed's
    `GatheredTensor`).
    """

    def __init__(self, where: str, tensors: dict[str, Any]):
        self.where = where
        self._tensors = tensors

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def get(self, key: str) -> torch.Tensor:
        value = self._tensors[key]
        return value if isinstance(value, torch.Tensor) else value.contiguous()


@dataclass(frozen=True)
class CheckpointInfo:
    """A complete checkpoint folder and what its run_state.json says about how it was written."""

    path: Path
    run_state: dict[str, Any]
    zero_stage: int
    world_size: int
    engine: str = "deepspeed"

    @property
    def hf_dir(self) -> Path:
        return self.path / "hf_config"


def find_checkpoint(path: str | Path) -> Path:
    """`SAVE/iter_NNNNNNN` (or any folder with a run_state.json), or `SAVE` via its `latest` file."""
    p = Path(path)
    if p.name.endswith(".tmp"):
        raise ValueError(
            f"{p} is an unfinished checkpoint (a .tmp folder: its save was interrupted or is "
            "still running); convert a complete iter_NNNNNNN folder"
        )
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    if not p.is_dir():
        raise ValueError(
            f"{p} is a file, not a checkpoint folder (to convert a consolidated state dict, "
            "pass --base-model)"
        )
    if (p / "run_state.json").is_file():
        return p
    ckpt = resolve_checkpoint(p)  # raises FileNotFoundError for an iter_ folder without run_state.json
    if ckpt is None:
        raise FileNotFoundError(
            f"{p} is neither a checkpoint (no run_state.json) nor a save folder (no `latest` file)"
        )
    return ckpt


def _read_run_state(ckpt: Path) -> dict[str, Any]:
    path = ckpt / "run_state.json"
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path} is not valid JSON ({err}); the checkpoint was only partly written"
        ) from None
    engine = state.setdefault("engine", "deepspeed")
    if engine not in ("deepspeed", "fsdp2"):
        raise ValueError(f"{path}: engine={engine!r} is not one of deepspeed, fsdp2")
    if engine == "fsdp2":
        state["zero_stage"] = 0  # not a DeepSpeed checkpoint: no ZeRO stage; the files are checked by engine
    for key in ("zero_stage", "world_size"):
        value = state.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{path}: {key}={value!r} should be a non-negative integer")
    if state["zero_stage"] > 3 or state["world_size"] < 1:
        raise ValueError(
            f"{path}: zero_stage={state['zero_stage']}, world_size={state['world_size']} are out of range"
        )
    return state


def _expected_files(stage: int, world: int) -> list[str]:
    """The files every complete checkpoint of this ZeRO stage and world size holds."""
    names = ["hf_config/config.json"] + [f"rng_state_rank{r}.pt" for r in range(world)]
    if stage < 3:
        names.append(MODEL_STATES)
    else:
        names += [RANK_MODEL_STATES.format(rank=r) for r in range(world)]
    if stage > 0:
        names += [RANK_OPTIM_STATES.format(rank=r) for r in range(world)]
    return names


def _expected_fsdp_files(world: int) -> list[str]:
    """The files of a complete FSDP2 checkpoint: DCP's metadata and one data file per rank."""
    names = ["hf_config/config.json", ".metadata"] + [f"rng_state_rank{r}.pt" for r in range(world)]
    return names + [f"__{r}_0.distcp" for r in range(world)]


def _present(ckpt: Path, name: str) -> bool:
    if "optim_states" in name:  # DeepSpeed prefixes the file with bf16_ when its bf16 optimizer is used
        return (ckpt / name).is_file() or (ckpt / f"bf16_{name}").is_file()
    return (ckpt / name).is_file()


def inspect_checkpoint(path: str | Path) -> CheckpointInfo:
    """Find the checkpoint and check it is complete: every rank's files, the HF config, a readable run state."""
    ckpt = find_checkpoint(path)
    state = _read_run_state(ckpt)
    stage, world = state["zero_stage"], state["world_size"]
    fsdp = state["engine"] == "fsdp2"
    expected = _expected_fsdp_files(world) if fsdp else _expected_files(stage, world)
    missing = [name for name in expected if not _present(ckpt, name)]
    if missing:
        kind = "FSDP2" if fsdp else f"ZeRO-{stage}"
        raise FileNotFoundError(
            f"checkpoint {ckpt} ({kind}, {world} processes) is incomplete: missing " + ", ".join(missing)
        )
    verify_checkpoint(ckpt)  # every state file it lists, at its recorded size
    ranks = {int(m.group(1)) for p in ckpt.iterdir() if (m := _RANK_FILE_RE.search(p.name))}
    if ranks and max(ranks) >= world:
        raise ValueError(
            f"checkpoint {ckpt} holds files of rank {max(ranks)}, but its run_state.json says "
            f"world_size={world}: files of two different saves are mixed"
        )
    return CheckpointInfo(ckpt, state, stage, world, state["engine"])


def _torch_load(path: Path, weights_only: bool) -> Any:
    """torch.load, memory-mapped; a damaged or truncated file becomes a ValueError naming it."""
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=weights_only)
    except Exception as err:  # noqa: BLE001 - torch raises RuntimeError, pickle/zip errors, EOFError ...
        raise ValueError(
            f"cannot read {path} ({type(err).__name__}: {err}); the file is damaged or was "
            "only partly written"
        ) from None


def _zero_fp32_tensors(info: CheckpointInfo) -> dict[str, Any]:
    """Lazy fp32 master weights rebuilt from every rank's optimizer partition (DeepSpeed's zero_to_fp32)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        # It prints progress lines and bars meant for its own script.
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return get_fp32_state_dict_from_zero_checkpoint(
                str(info.path.parent), tag=info.path.name, lazy_mode=True
            )
    except Exception as err:  # noqa: BLE001 - torch.load and DeepSpeed raise many kinds of errors
        raise ValueError(
            f"cannot rebuild the fp32 weights of {info.path} from its ZeRO partitions "
            f"({type(err).__name__}: {err}); a file is damaged or only partly written"
        ) from None


def checkpoint_source(info: CheckpointInfo) -> TensorSource:
    """The checkpoint's full weights under the trainer's module names (`model.<HF key>`)."""
    if info.engine == "fsdp2":
        return dcp_checkpoint_source(info.path)
    if info.zero_stage == 3:
        return TensorSource(str(info.path), _zero_fp32_tensors(info))
    states = _torch_load(info.path / MODEL_STATES, weights_only=False)
    module = states.get("module") if isinstance(states, dict) else None
    if not isinstance(module, dict):
        raise ValueError(
            f"{info.path / MODEL_STATES} holds no module state (not a DeepSpeed model-states file)"
        )
    half = [k for k, v in module.items() if v.is_floating_point() and v.dtype != torch.float32]
    if half and info.zero_stage > 0:
        # A DeepSpeed config that enabled bf16/fp16 keeps the fp32 master weights only in the partitions.
        ep = info.run_state.get("expert_parallel_size", 1)
        if ep > 1:  # ... which zero_to_fp32 cannot put together: each EP rank's partitions hold other experts
            raise ValueError(
                f"{info.path} holds half-precision weights and was trained with expert_parallel_size={ep}: "
                "its fp32 master weights cannot be rebuilt from the ZeRO partitions"
            )
        return TensorSource(str(info.path), _zero_fp32_tensors(info))
    return TensorSource(str(info.path / MODEL_STATES), module)


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("module", "state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return obj


class _LazyFile:
    """One safetensors or torch state-dict file, opened on first use.

    With `reopen`, each safetensors tensor is read through a memory map of its own, closed once the tensor is
    copied out: the pages a kept map has touched count as resident memory until it is closed, so a kept map
    grows the resident set to the whole file when every tensor is read once."""

    def __init__(self, path: Path, reopen: bool = False):
        self.path = path
        self.reopen = reopen and path.suffix == ".safetensors"
        self._handle: Any = None

    def handle(self) -> Any:
        if self._handle is None:
            if self.path.suffix == ".safetensors":
                from safetensors import safe_open

                try:
                    self._handle = safe_open(str(self.path), framework="pt")
                except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
                    raise ValueError(
                        f"cannot read {self.path} ({err}); the file is damaged or only partly written"
                    ) from None
            else:
                self._handle = _unwrap_state_dict(_torch_load(self.path, weights_only=True), self.path)
        return self._handle

    def keys(self) -> list[str]:
        return list(self.handle().keys())

    def shape(self, key: str) -> tuple[int, ...]:
        h = self.handle()
        return (
            tuple(h.get_slice(key).get_shape()) if self.path.suffix == ".safetensors" else tuple(h[key].shape)
        )

    def get(self, key: str) -> torch.Tensor:
        if self.reopen:
            from safetensors import safe_open

            with safe_open(str(self.path), framework="pt") as h:
                return h.get_tensor(key)
        h = self.handle()
        return h.get_tensor(key) if self.path.suffix == ".safetensors" else h[key]


class FileSource(TensorSource):
    """A consolidated state dict in one file or in shards listed by an index."""

    def __init__(self, where: str, key_files: dict[str, _LazyFile]):
        super().__init__(where, {})
        self._files = key_files

    def keys(self) -> list[str]:
        return list(self._files)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._files[key].shape(key)

    def get(self, key: str) -> torch.Tensor:
        return self._files[key].get(key)


def _index_source(index: Path, reopen: bool = False) -> FileSource:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{index} is not a valid index file ({type(err).__name__}: {err})") from None
    files = {name: _LazyFile(index.parent / name, reopen) for name in sorted(set(weight_map.values()))}
    missing = [name for name, f in files.items() if not f.path.is_file()]
    if missing:
        raise FileNotFoundError(f"{index} lists shards that do not exist: {', '.join(missing)}")
    return FileSource(str(index.parent), {key: files[name] for key, name in weight_map.items()})


def state_dict_source(path: str | Path, reopen: bool = False) -> FileSource:
    """A state-dict file (.safetensors, .bin, .pt, .pth) or a folder holding one (sharded with an index or not).

    `reopen`: map a safetensors file anew for each tensor read (see `_LazyFile`), for readers that read every
    tensor once and want the resident set to stay near the tensors they hold."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"state dict {p} does not exist")
    if p.is_dir():
        for name in STATE_DICT_INDEXES:
            if (p / name).is_file():
                return _index_source(p / name, reopen)
        for name in STATE_DICT_FILES:
            if (p / name).is_file():
                p = p / name
                break
        else:
            raise FileNotFoundError(
                f"{p} holds no state dict (looked for {', '.join(STATE_DICT_INDEXES + STATE_DICT_FILES)})"
            )
    lazy = _LazyFile(p, reopen)
    return FileSource(str(p), dict.fromkeys(lazy.keys(), lazy))


class _DCPTensor:
    """One tensor of a DCP checkpoint: its shape from the metadata, its values loaded on `.contiguous()`."""

    def __init__(self, path: Path, key: str, shape: tuple[int, ...], dtype: torch.dtype):
        self.path, self.key, self.shape, self.dtype = path, key, torch.Size(shape), dtype

    def contiguous(self) -> torch.Tensor:
        import torch.distributed.checkpoint as dcp

        out = torch.empty(self.shape, dtype=self.dtype)
        try:
            # A partial load in this process only: DCP assembles the tensor from every rank's shards.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load({self.key: out}, checkpoint_id=str(self.path), no_dist=True)
        except Exception as err:  # noqa: BLE001 - DCP wraps reader errors in CheckpointException
            raise ValueError(
                f"cannot read {self.key} from {self.path} ({type(err).__name__}: {err}); a .distcp file is "
                "damaged or only partly written"
            ) from None
        return out


def dcp_checkpoint_source(path: Path, prefix: str = "model.") -> TensorSource:
    """The model tensors of an FSDP2 checkpoint (keys under `prefix`, which is stripped), read lazily."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception as err:  # noqa: BLE001 - pickle and file errors
        raise ValueError(f"cannot read {path / '.metadata'} ({type(err).__name__}: {err})") from None
    tensors: dict[str, Any] = {}
    for key, meta in metadata.state_dict_metadata.items():
        if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata):
            tensors[key[len(prefix) :]] = _DCPTensor(path, key, tuple(meta.size), meta.properties.dtype)
    if not tensors:
        raise ValueError(f"{path / '.metadata'} lists no model tensors (no keys starting with {prefix!r})")
    return TensorSource(str(path), tensors)
