"""Load a Hugging Face causal-LM folder as it is, on the fast MoE path.

The folder may be one written by ``init-model``, a hub download or a converted checkpoint: whatever
``AutoModelForCausalLM.from_pretrained`` reads. Two things are chosen here rather than left to defaults:

* attention: ``sdpa`` unless asked otherwise; ``flash_attention_*`` only when the package is installed
  (a clear ``ValueError`` instead of a deep import error);
* experts: ``grouped_mm`` (one grouped GEMM per projection, has a CPU kernel) whenever the model class
  supports choosing, and HF's per-expert ``eager`` loop only when asked for. Dense models have no experts
  and are loaded without the option (passing it to them is an error in transformers).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available

_FLASH_CHECKS = {
    "flash_attention_2": ("flash-attn", is_flash_attn_2_available),
    "flash_attention_3": ("flash-attn 3 (flash_attn_interface)", is_flash_attn_3_available),
}


def _check_folder(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"model folder {path} does not exist")
    if not path.is_dir():
        raise FileNotFoundError(f"model path {path} is not a folder")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model folder {path} has no config.json (not a Hugging Face model folder)")


def _check_attention(attn_implementation: str) -> None:
    if attn_implementation in _FLASH_CHECKS:
        package, available = _FLASH_CHECKS[attn_implementation]
        if not available():
            raise ValueError(
                f"attn_implementation={attn_implementation!r} needs {package}, which is not installed "
                "(or has no usable GPU); use 'sdpa' or install it"
            )


def _model_class_supports_experts_choice(config: object) -> bool:
    """Whether the class that ``AutoModelForCausalLM`` would build accepts ``experts_implementation``."""
    model_class = AutoModelForCausalLM._model_mapping.get(type(config), None)
    if model_class is None:
        return False
    return bool(model_class._can_set_experts_implementation())


def load_model(
    path: str,
    *,
    attn_implementation: str = "sdpa",
    experts_implementation: str = "grouped_mm",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    device_map: str | dict[str, Any] | None = None,
    max_memory: dict[int | str, int | str] | None = None,
    offload_folder: str | None = None,
) -> PreTrainedModel:
    """Load the model folder at ``path`` with the chosen attention/experts kernels, dtype and device.

    ``experts_implementation`` is ignored for models whose class cannot switch it (dense models).
    With ``device_map`` (e.g. ``"auto"``: accelerate places the modules over the visible GPUs, then the CPU,
    then ``offload_folder`` on disk, within ``max_memory`` per device) ``device`` is not used: the model is
    left where ``from_pretrained`` placed it (inference only; training shards through its engine).
    Raises ``FileNotFoundError`` for a missing folder or config, ``ValueError`` for an unavailable
    attention kernel or an unknown experts implementation, ``ImportError`` when a device map needs
    accelerate and it is missing. The model is returned in eval mode (transformers' default); the trainer
    switches it to train mode.
    """
    folder = Path(path)
    _check_folder(folder)
    _check_attention(attn_implementation)
    config = AutoConfig.from_pretrained(str(folder))
    kwargs: dict[str, object] = {"attn_implementation": attn_implementation, "dtype": dtype}
    if _model_class_supports_experts_choice(config):
        kwargs["experts_implementation"] = experts_implementation
    if device_map is not None:
        if importlib.util.find_spec("accelerate") is None:
            raise ImportError(f"device_map={device_map!r} needs accelerate: pip install accelerate")
        kwargs.update(device_map=device_map, max_memory=max_memory, offload_folder=offload_folder)
        return AutoModelForCausalLM.from_pretrained(str(folder), config=config, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(str(folder), config=config, **kwargs)
    return model.to(device)
