"""Which datasets and collator a training config asks for (`data.format`), in one place."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from moe_recipes.config import Config
from moe_recipes.data.batching import PretrainCollator
from moe_recipes.data.pretrain import build_pretrain_datasets


@dataclass
class TrainingData:
    """Map-style train/valid datasets (`ds[i]` -> a sample dict) and the collator that batches them."""

    train: Any
    valid: Any | None
    collate: Callable[[list[dict[str, Any]]], dict[str, Any]]


def build_training_data(cfg: Config) -> TrainingData:
    """Datasets with at least train.iters x global_batch_size training samples and eval.iters global
    batches of validation samples."""
    if cfg.data.format == "chat":
        from moe_recipes.data.packing import build_chat_data

        return build_chat_data(cfg)  # sets cfg.train.iters when train.epochs is given
    if cfg.train.epochs is not None:
        raise ValueError("train.epochs needs data.format=chat (pre-training counts train.iters)")
    t = cfg.train
    n_train = t.iters * t.global_batch_size
    n_valid = cfg.eval.iters * t.global_batch_size
    train, valid, _ = build_pretrain_datasets(
        cfg.data.path,
        cfg.data.split,
        cfg.data.seq_length,
        (n_train, n_valid, 0),
        seed=t.seed,
        cache_dir=cfg.data.cache_dir,
    )
    if train is None:
        raise ValueError(f"data.split={cfg.data.split!r} leaves no training documents in {cfg.data.path}")
    return TrainingData(
        train, valid, PretrainCollator(cfg.data.reset_position_ids, cfg.data.reset_attention_mask)
    )
