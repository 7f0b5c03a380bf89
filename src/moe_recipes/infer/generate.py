"""`moe-recipes generate`: text from a Hugging Face folder, streamed token by token as it is produced.

The model is loaded as training loads it (`models.loading.load_model`: sdpa attention, grouped-GEMM
experts), in bf16 where the device computes it natively and fp32 elsewhere unless asked otherwise. Temperature 0 is greedy decoding
(`do_sample=False`), so its output is exactly `model.generate`'s greedy output.

Without `--chat` the prompt is tokenized as pre-training text: it starts with the tokenizer's BOS token when
the tokenizer has one, as every document does after `moe-recipes prepare` (whether or not the tokenizer
adds it by itself). With `--chat` the prompt becomes one user message rendered by the tokenizer's chat
template (with the assistant turn opened), which supplies its own special tokens.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}


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


def load_tokenizer(model_dir: str | Path) -> Any:
    from transformers import AutoTokenizer

    folder = Path(model_dir)
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise FileNotFoundError(
            f"{folder} holds no tokenizer (tokenizer.json, tokenizer.model or vocab.json)"
        )
    return AutoTokenizer.from_pretrained(str(folder))


def load_for_inference(
    model_dir: str | Path, device: str | torch.device | None = None, dtype: str | None = "auto"
) -> tuple[Any, Any]:
    """(model in eval mode on `device`, tokenizer) of a Hugging Face folder."""
    from moe_recipes.models.loading import load_model

    dev = pick_device(device)
    model = load_model(str(model_dir), dtype=pick_dtype(dtype, dev), device=dev)
    model.eval()
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
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
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
) -> str:
    """Load the folder and return the generated continuation of `prompt` (printed as it comes with `stream`)."""
    model, tokenizer = load_for_inference(model_dir, device=device, dtype=dtype)
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
