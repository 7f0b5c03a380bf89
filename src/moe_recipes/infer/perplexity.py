"""`moe-recipes eval`: perplexity of a Hugging Face folder on a prepared (indexed) dataset.

The samples are the trainer's: `build_pretrain_datasets` with the same split string and seed, the same
collator, and the loss computed as the trainer's objective computes it (decoder, then the chunked
cross-entropy of `models.losses` with the model's logit scaling; bf16 autocast over fp32 weights when the
precision is bf16). So `--max-samples N` with N = eval.iters x train.global_batch_size, on a checkpoint of
step S, reproduces the trainer's `valid_loss` at step S (the trainer evaluates the first N samples of a
valid split built for N samples, whatever the number of processes). Without `--max-samples`, one pass over
the split is evaluated.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moe_recipes.data.batching import PretrainCollator
from moe_recipes.data.indexed import IndexedDataset
from moe_recipes.data.pretrain import (
    SPLIT_NAMES,
    build_pretrain_datasets,
    parse_data_path,
    parse_split,
    split_document_ranges,
)
from moe_recipes.models.losses import chunked_causal_lm_loss, lm_head_spec
from moe_recipes.precision import autocast_every_matmul


@dataclass(frozen=True)
class PerplexityResult:
    """Mean token cross-entropy (nats), its exponential, and how much was evaluated."""

    loss: float
    perplexity: float
    tokens: int
    samples: int

    def summary(self, which: str) -> str:
        return (
            f"{which}: loss {self.loss:.6f} | perplexity {self.perplexity:.4f} | {self.samples} samples, "
            f"{self.tokens} tokens"
        )


def one_epoch_samples(data: str | Sequence[Any], split: str, seq_length: int, which: str) -> int:
    """Windows of `seq_length + 1` tokens in one pass over the `which` split of every prefix."""
    s = SPLIT_NAMES.index(which)
    fractions = parse_split(split)
    total = 0
    for _, prefix in parse_data_path(data):
        ds = IndexedDataset(prefix)
        start, end = split_document_ranges(len(ds), fractions)[s]
        tokens = int(ds.sizes[start:end].sum())
        total += max(0, (tokens - 1) // seq_length)
    if total == 0:
        raise ValueError(
            f"the {which} split ({split}) of {data} holds fewer than seq_length + 1 = {seq_length + 1} tokens"
        )
    return total


def eval_dataset(
    data: str | Sequence[Any],
    split: str,
    seq_length: int,
    seed: int,
    which: str,
    max_samples: int | None,
    cache_dir: str | None,
) -> tuple[Any, int]:
    """(dataset, samples to evaluate) for the `which` split, built as the trainer builds it."""
    if which not in SPLIT_NAMES:
        raise ValueError(f"which={which!r} is not one of {', '.join(SPLIT_NAMES)}")
    if max_samples is not None and max_samples <= 0:
        raise ValueError(f"max_samples must be > 0, got {max_samples}")
    n = max_samples if max_samples is not None else one_epoch_samples(data, split, seq_length, which)
    counts = [n if name == which else 0 for name in SPLIT_NAMES]
    datasets = build_pretrain_datasets(data, split, seq_length, counts, seed=seed, cache_dir=cache_dir)
    dataset = datasets[SPLIT_NAMES.index(which)]
    if dataset is None:
        raise ValueError(f"data split {split!r} leaves no {which} documents in {data}")
    return dataset, min(n, len(dataset))


def _loss_sum(model: Any, batch: dict[str, torch.Tensor], chunk_size: int, bf16: bool) -> tuple[float, int]:
    """Summed token cross-entropy of one batch, computed as the trainer's objective does. On a model spread
    by accelerate the inputs go to the embedding's device and the last hidden state to the LM head's."""
    from moe_recipes.infer.generate import input_device, module_device

    device = input_device(model)
    batch = {k: v.to(device) for k, v in batch.items()}
    autocast: contextlib.AbstractContextManager = contextlib.nullcontext()
    if bf16:  # as the trainer's objective computes: the routed experts' grouped_mm in bf16 too
        autocast_every_matmul(device.type)
        autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    with torch.no_grad(), autocast:
        out = model.get_decoder()(
            input_ids=batch["input_ids"],
            position_ids=batch.get("position_ids"),
            attention_mask=batch.get("attention_mask"),
            use_cache=False,
        )
        head = model.get_output_embeddings()
        loss, tokens = chunked_causal_lm_loss(
            out.last_hidden_state.to(module_device(head)),
            head,
            batch["labels"],
            chunk_size=chunk_size,
            **lm_head_spec(model),
        )
    return float(loss.double().item()), int(tokens.item())


def perplexity(
    model: Any,
    dataset: Any,
    count: int,
    batch_size: int = 1,
    collate: PretrainCollator | None = None,
    bf16: bool = False,
    chunk_size: int = 1024,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of `model` on the first `count` samples of `dataset`, with a tqdm progress bar."""
    from tqdm import tqdm

    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    collate = collate or PretrainCollator()
    total, tokens = 0.0, 0
    with tqdm(total=count, unit="sample", desc="eval", disable=not progress) as bar:
        for start in range(0, count, batch_size):
            stop = min(start + batch_size, count)
            loss, n = _loss_sum(model, collate([dataset[i] for i in range(start, stop)]), chunk_size, bf16)
            total, tokens = total + loss, tokens + n
            bar.update(stop - start)
            bar.set_postfix(loss=f"{total / max(tokens, 1):.4f}")
    mean = total / max(tokens, 1)
    return PerplexityResult(mean, math.exp(min(mean, 700.0)), tokens, count)


def evaluate_perplexity(
    model_dir: str | Path,
    data: str | Sequence[Any],
    *,
    seq_length: int = 2048,
    max_samples: int | None = None,
    split: str = "969,30,1",
    seed: int = 1234,
    which: str = "valid",
    batch_size: int = 1,
    cache_dir: str | None = None,
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
    precision: str = "auto",
    device: str | None = None,
    progress: bool = True,
    dtype: str = "auto",
    device_map: str | None = None,
    max_memory: dict[int | str, int | str] | None = None,
    offload_folder: str | None = None,
) -> PerplexityResult:
    """Load the folder and evaluate it on the `which` split of `data` (see the module docstring).

    precision: "auto" (bf16 autocast where the device computes bf16 natively, else fp32), "fp32" or "bf16".
    dtype: the weights' dtype; "auto" is bf16 on a GPU that computes in bf16 (half a large model's memory),
    fp32 elsewhere; "fp32" keeps fp32 weights under bf16 autocast, exactly as training computes, so the
    trainer's valid_loss is reproduced.
    device_map, max_memory, offload_folder: as `generate.load_for_inference` (accelerate's placement).
    """
    from moe_recipes.infer.generate import DTYPES, load_inference_model, pick_device
    from moe_recipes.precision import PRECISIONS, resolve_precision

    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if dtype not in ("auto", *DTYPES):
        raise ValueError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    if reset_attention_mask and not reset_position_ids:
        raise ValueError("reset_attention_mask needs reset_position_ids (as data.reset_attention_mask does)")
    dataset, count = eval_dataset(data, split, seq_length, seed, which, max_samples, cache_dir)
    target = pick_device(device)
    bf16 = resolve_precision(precision, target).bf16
    if dtype == "auto":  # bf16 weights where memory is scarce (a GPU computing in bf16); else as training
        dtype = "bf16" if bf16 and target.type != "cpu" else "fp32"
    weights = dtype
    model = load_inference_model(model_dir, device, weights, device_map, max_memory, offload_folder)
    return perplexity(
        model,
        dataset,
        count,
        batch_size,
        PretrainCollator(reset_position_ids, reset_attention_mask),
        bf16=bf16,
        progress=progress,
    )
