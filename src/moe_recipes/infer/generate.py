"""`moe-recipes generate`: text from a Hugging Face folder, streamed token by token as it is produced.

The model is loaded as training loads it (`models.loading.load_model`: sdpa attention, grouped-GEMM
experts), in bf16 where the device computes it natively and fp32 elsewhere unless asked otherwise. Temperature 0 is greedy decoding
(`do_sample=False`), so its output is exactly `model.generate`'s greedy output.

A model larger than one GPU is spread with ``device_map="auto"``: accelerate places its modules over the
visible GPUs, then CPU memory (then disk, with an offload folder), as ``from_pretrained(device_map="auto")``
does, and moves activations between them; the inputs go to the device of the input embedding
(`input_device`). That is the default where a GPU is visible and no device is named (`pick_device_map`).

Without `--chat` the prompt is tokenized as pre-training text: it starts with the tokenizer's BOS token when
the tokenizer has one, as every document does after `moe-recipes prepare` (whether or not the tokenizer
adds it by itself). With `--chat` the prompt becomes one user message rendered by the tokenizer's chat
template (with the assistant turn opened), which supplies its own special tokens.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEVICE_MAPS = ("none", "auto")


@dataclass(frozen=True)
class Generation:
    """Prompt tokens, the new tokens and their decoded text (special tokens left out)."""

    prompt_ids: list[int]
    token_ids: list[int]
    text: str


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """The given device, else the first GPU when there is one, else the CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """'auto' (or None): bf16 where the device computes it natively, else fp32 (as train.precision=auto);
    else 'fp32' or 'bf16'."""
    from moe_recipes.precision import resolve_precision

    if dtype not in (None, "auto", *DTYPES):
        raise ValueError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return resolve_precision(dtype or "auto", device).dtype


def pick_device_map(device_map: str | None, device: str | torch.device | None = None) -> str:
    """'none' (the whole model on one device) or 'auto' (accelerate's placement over the GPUs, then the CPU).

    Not given: 'auto' where a GPU is visible and no device is named, else 'none'. 'auto' with a device is an
    error: the placement chooses the devices.
    """
    if device_map not in (None, *DEVICE_MAPS):
        raise ValueError(f"device_map {device_map!r} is not one of {', '.join(DEVICE_MAPS)}")
    if device_map is None:
        return "auto" if device is None and torch.cuda.is_available() else "none"
    if device_map == "auto" and device is not None:
        raise ValueError(f"device_map 'auto' places the model itself: leave out the device ({device})")
    return device_map


def module_device(module: Any) -> torch.device:
    """Where `module` computes: the device its accelerate hook runs it on when it has one (offloaded weights
    are on ``meta`` until then), else its weight's device."""
    where = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
    if where is None:
        return module.weight.device
    return torch.device("cuda", where) if isinstance(where, int) else torch.device(where)


def input_device(model: Any) -> torch.device:
    """Where the model's inputs belong: the device of its input embedding (accelerate puts a spread model's
    first module on the first GPU; `module_device`)."""
    return module_device(model.get_input_embeddings())


def placement(model: Any) -> str:
    """How accelerate spread the model: modules per device, e.g. `cuda:0 18, cuda:1 17, cpu 2`."""
    spread = getattr(model, "hf_device_map", None)
    if not spread:
        return f"all on {input_device(model)}"
    counts: dict[str, int] = {}
    for where in spread.values():
        name = f"cuda:{where}" if isinstance(where, int) else str(where)
        counts[name] = counts.get(name, 0) + 1
    return ", ".join(f"{name} {n}" for name, n in counts.items()) + " (modules)"


def load_tokenizer(model_dir: str | Path) -> Any:
    from transformers import AutoTokenizer

    folder = Path(model_dir)
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise FileNotFoundError(
            f"{folder} holds no tokenizer (tokenizer.json, tokenizer.model or vocab.json)"
        )
    return AutoTokenizer.from_pretrained(str(folder))


def load_inference_model(
    model_dir: str | Path,
    device: str | torch.device | None = None,
    dtype: str | None = "auto",
    device_map: str | None = None,
    max_memory: dict[int | str, int | str] | None = None,
    offload_folder: str | None = None,
) -> Any:
    """The model of a Hugging Face folder in eval mode: on `device`, or spread by accelerate with `device_map`
    'auto' (within `max_memory` per device, the rest in `offload_folder`; `pick_device_map` gives the
    default). `dtype` 'auto' chooses for `device`, or for the first GPU when spread (the CPU without one)."""
    from moe_recipes.models.loading import load_model

    placed = pick_device_map(device_map, device)
    dev = pick_device(device)
    if placed == "auto":
        model = load_model(
            str(model_dir),
            dtype=pick_dtype(dtype, dev),
            device_map="auto",
            max_memory=max_memory,
            offload_folder=offload_folder,
        )
    else:
        model = load_model(str(model_dir), dtype=pick_dtype(dtype, dev), device=dev)
    return model.eval()


def load_for_inference(
    model_dir: str | Path,
    device: str | torch.device | None = None,
    dtype: str | None = "auto",
    device_map: str | None = None,
    max_memory: dict[int | str, int | str] | None = None,
    offload_folder: str | None = None,
) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) of a Hugging Face folder; the model as `load_inference_model` gives it."""
    model = load_inference_model(model_dir, device, dtype, device_map, max_memory, offload_folder)
    return model, load_tokenizer(model_dir)


def prompt_ids(tokenizer: Any, prompt: str, chat: bool = False) -> list[int]:
    """Token ids of the prompt: as a chat user turn (chat template) or as document text starting with BOS."""
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"--chat: the tokenizer {tokenizer.name_or_path} has no chat template")
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    ids = list(tokenizer(prompt)["input_ids"])
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    return ids


def _generation_config(model: Any, max_new_tokens: int, temperature: float, top_p: float) -> Any:
    """The model's own generation config with length and sampling set from the arguments."""
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be > 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    config = copy.deepcopy(model.generation_config)
    config.max_new_tokens = max_new_tokens
    config.max_length = None
    config.do_sample = temperature > 0
    if config.do_sample:
        config.temperature, config.top_p = temperature, top_p
    if config.pad_token_id is None and config.eos_token_id is not None:
        eos = config.eos_token_id
        config.pad_token_id = eos[0] if isinstance(eos, list) else eos
    return config


def generate(
    model: Any,
    tokenizer: Any,
    prompt: str,
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    chat: bool = False,
    seed: int | None = None,
    stream: bool = False,
) -> Generation:
    """Continue `prompt` with `model`; with `stream`, print the new text to stdout as it is produced."""
    from transformers import TextStreamer

    config = _generation_config(model, max_new_tokens, temperature, top_p)
    ids = prompt_ids(tokenizer, prompt, chat)
    if seed is not None:
        torch.manual_seed(seed)
        if torch.cuda.is_available():
            torch.cuda.manual_seed_all(seed)
    input_ids = torch.tensor([ids], dtype=torch.long, device=input_device(model))
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            generation_config=config,
            streamer=streamer,
        )
    new = out[0, len(ids) :].tolist()
    return Generation(ids, new, tokenizer.decode(new, skip_special_tokens=True))


def generate_text(
    model_dir: str | Path,
    prompt: str,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    chat: bool = False,
    seed: int | None = None,
    stream: bool = True,
    device: str | None = None,
    dtype: str | None = "auto",
    device_map: str | None = None,
) -> str:
    """Load the folder and return the generated continuation of `prompt` (printed as it comes with `stream`).
    With `device_map` 'auto' the placement is reported on stderr."""
    model, tokenizer = load_for_inference(model_dir, device=device, dtype=dtype, device_map=device_map)
    if getattr(model, "hf_device_map", None):
        print(f"[moe-recipes] device map auto: {placement(model)}", file=sys.stderr, flush=True)
    return generate(
        model,
        tokenizer,
        prompt,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        chat=chat,
        seed=seed,
        stream=stream,
    ).text
