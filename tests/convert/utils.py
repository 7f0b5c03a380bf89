"""Helpers for the conversion tests: base models of every architecture, training with a live reference."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import torch
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


def expected_keys(config_dir: Path | str) -> set[str]:
    """The names the HF model of this config has in its state dict, tied aliases left out."""
    from transformers import AutoConfig

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(config_dir)))
    params = {name for name, _ in model.named_parameters()}  # tied aliases removed
    all_params = dict(model.named_parameters(remove_duplicate=False))
    persistent_buffers = {k for k in model.state_dict() if k not in all_params}
    return params | persistent_buffers


def last_valid_loss(run_dir: Path) -> float:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["valid_loss"] for r in records if "valid_loss" in r][-1]
