"""Helpers for the conversion tests: base models of every architecture, training with a live reference."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from moe_recipes.config import Config
from moe_recipes.models.init import build_config, make_dims
from moe_recipes.train import trainer
from moe_recipes.train.signals import StopRequest

# Two steps, evaluated (2 micro-batches) and saved at the end.
SHORT = ("train.iters=2", "eval.interval=0", "eval.iters=2")


def probe_ids(vocab_size: int = 32000) -> torch.Tensor:
    """A fixed (2, 24) batch of token ids to compare logits on."""
    return torch.randint(0, vocab_size, (2, 24), generator=torch.Generator().manual_seed(7))


def make_base(
    arch: str, tokenizer_dir: Path, out: Path, *, tie: bool = False, expert_bias: bool = False
) -> str:
    """A tiny random `arch` model folder with the tokenizer; optionally tied embeddings and (DeepSeek-V3)
    non-zero `e_score_correction_bias` buffers, so that a conversion that drops them changes the logits."""
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    dims = make_dims(
        arch,
        hidden_size=64,
        intermediate_size=128,
        expert_intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        num_experts=4,
        top_k=2,
        max_position_embeddings=512,
    )
    config = build_config(
        arch,
        dims,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config.tie_word_embeddings = tie
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    if expert_bias:
        biases = [b for name, b in model.named_buffers() if name.endswith("e_score_correction_bias")]
        assert biases, f"{arch} has no e_score_correction_bias buffers"
        for b in biases:
            b.copy_(torch.randn(b.shape) * 0.5)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return str(out)


def train_with_reference(cfg: Config, ids: torch.Tensor) -> torch.Tensor:
    """Train in this process and return the logits of the trainer's own model on `ids` after the last step."""
    run = trainer.setup(cfg)
    try:
        assert trainer._loop(run, StopRequest()) == 0
    finally:
        run.writer.close()
    model = run.engine.module.model
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float().clone()
    # Drop the engine (and ZeRO-3's HfDeepSpeedConfig, which would make from_pretrained partition weights).
    del run, model
    gc.collect()
    return logits


def logits_of(folder: Path | str, ids: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def weight_map(folder: Path) -> dict[str, str]:
    return json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]


def folder_layout(folder: Path | str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every tensor a safetensors model folder holds: name -> (shape, dtype), read from the file headers."""
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    assert files, f"{folder} holds no safetensors files"
    out = {}
    for path in files:
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                out[key] = (tuple(sl.get_shape()), _SAFETENSORS_DTYPES[sl.get_dtype()])
    return out


_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "I64": torch.int64}


def expected_keys(base: Path | str) -> set[str]:
    """The names `save_pretrained` wrote into the base folder: the released layout of its architecture."""
    return set(folder_layout(base))


def assert_released_layout(folder: Path | str, base: Path | str, dtype: torch.dtype | None = None) -> None:
    """`folder` holds exactly the tensor names and shapes `save_pretrained` wrote into `base` (and their
    dtypes, or `dtype` for every tensor the base holds in its own float dtype)."""
    got, want = folder_layout(folder), folder_layout(base)
    assert set(got) == set(want), (
        f"missing {sorted(set(want) - set(got))[:4]}, extra {sorted(set(got) - set(want))[:4]}"
    )
    for name, (shape, base_dtype) in want.items():
        assert got[name][0] == shape, f"{name}: shape {got[name][0]}, save_pretrained wrote {shape}"
        if dtype is None:
            assert got[name][1] == base_dtype, (
                f"{name}: dtype {got[name][1]}, save_pretrained wrote {base_dtype}"
            )


def last_valid_loss(run_dir: Path) -> float:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["valid_loss"] for r in records if "valid_loss" in r][-1]
