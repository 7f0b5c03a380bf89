"""Checks that cost a second, run before anything that costs minutes (rendezvous, model load, op builds).

`preflight(cfg)` opens the model's config.json, every data file and the checkpoint to resume from, and
checks them against each other: a typo in a path, a dataset whose token ids do not fit the model's
vocabulary or a resume with a different sequence length stops the run here, naming the file, key and
values at fault. Settings that have no effect in the chosen combination print one warning each.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moe_recipes.config import Config

# Keys of run_state.json that must match the config on resume, unless named in checkpoint.allow_changes.
RESUME_KEYS = {
    "seq_length": "data.seq_length",
    "global_batch_size": "train.global_batch_size",
    "base_model": "model.path",
}


@dataclass
class Preflight:
    """What the checks found: the model's vocabulary, the checkpoint to resume (or None), the warnings."""

    vocab_size: int
    resume_from: Path | None
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def preflight(cfg: Config) -> Preflight:
    """Run every cheap check; raise ValueError/FileNotFoundError/ImportError naming what is wrong."""
    _check_engine_installed(cfg)
    if cfg.distributed.engine == "deepspeed" and cfg.distributed.expert_parallel_size > 1:
        from moe_recipes.engines.deepspeed_ep import check_deepspeed_config

        check_deepspeed_config(cfg)
    vocab = model_vocab_size(cfg.model.path)
    if cfg.data.format == "chat":
        _check_chat_files(cfg)
    else:
        _check_pretrain_data(cfg.data.path, vocab)
    check_expert_parallel_fits(cfg)
    result = Preflight(vocab_size=vocab, resume_from=None, warnings=ineffective_settings(cfg))
    result.resume_from, note = _resume_checkpoint(cfg)
    if note:
        result.notes.append(note)
    if result.resume_from is not None:
        check_resume_compatible(cfg, result.resume_from)
    return result


def _check_engine_installed(cfg: Config) -> None:
    if cfg.distributed.engine == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise ImportError(
            "distributed.engine=deepspeed needs DeepSpeed, which is not installed: "
            "pip install --no-build-isolation 'moe-recipes[deepspeed]' (after torch), "
            "or use distributed.engine=fsdp2, which needs nothing beyond torch"
        )


def model_vocab_size(path: str) -> int:
    """The vocabulary size in the model folder's config.json (checking the folder on the way)."""
    from transformers import AutoConfig

    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"model.path: {folder} is not a folder")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"model.path: {folder} has no config.json (not a Hugging Face model folder)")
    try:
        config = AutoConfig.from_pretrained(str(folder))
    except (ValueError, OSError, json.JSONDecodeError) as err:
        raise ValueError(f"model.path: {folder / 'config.json'} cannot be read: {err}") from None
    vocab = getattr(config.get_text_config(), "vocab_size", None)
    if not isinstance(vocab, int) or vocab <= 0:
        raise ValueError(f"model.path: {folder / 'config.json'} has no valid vocab_size ({vocab!r})")
    return vocab


def check_expert_parallel_fits(cfg: Config, world_size: int | None = None) -> None:
    """`distributed.expert_parallel_size` against the process count (from the launcher's variables) and
    the model's routed experts (read from a meta-device build of its config: no weights are loaded)."""
    ep = cfg.distributed.expert_parallel_size
    if ep == 1:
        return
    from moe_recipes.distributed.env import detect_env
    from moe_recipes.distributed.expert_parallel import check_expert_parallel
    from moe_recipes.models.inspect import inspect_model
    from moe_recipes.train.plan import meta_model

    world = detect_env().world_size if world_size is None else world_size
    info = inspect_model(meta_model(cfg.model.path))
    check_expert_parallel(ep, world, info.num_experts, where=f" in model.path {cfg.model.path}")


def _check_pretrain_data(data_path: Any, vocab: int) -> None:
    """Every prefix opens (index header, .bin size) and its sampled largest token id is below `vocab`."""
    from moe_recipes.data.indexed import IndexedDataset, bin_path
    from moe_recipes.data.info import largest_token_id
    from moe_recipes.data.pretrain import parse_data_path

    for _, prefix in parse_data_path(data_path):
        ds = IndexedDataset(prefix)
        largest = largest_token_id(ds, max_tokens=SAMPLE_TOKENS)
        if largest is not None and largest >= vocab:
            raise ValueError(
                f"data.path: {bin_path(prefix)} holds token id {largest}, but the model's vocabulary has "
                f"{vocab} ids (vocab_size in model.path's config.json): was it tokenized with another "
                "tokenizer?"
            )


# Token ids read per dataset to find its largest id: all of a dataset up to this size, evenly spaced
# windows of a larger one (a wrong tokenizer shows up everywhere, not in one corner).
SAMPLE_TOKENS = 1 << 25


def _check_chat_files(cfg: Config) -> None:
    from moe_recipes.data.chat import build_index
    from moe_recipes.data.packing import parse_chat_paths

    paths, _ = parse_chat_paths(cfg.data.path)
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"data.path: chat file {path} not found")
    for path in paths:  # reads every line once (cached beside the file); errors name file and line
        build_index(path, skip_bad_lines=cfg.data.skip_bad_lines)


def _resume_checkpoint(cfg: Config) -> tuple[Path | None, str | None]:
    """The checkpoint `checkpoint.load` names. Loading from checkpoint.save itself (`--resume`) may find
    nothing yet and start fresh; any other checkpoint.load must name an existing checkpoint."""
    from moe_recipes.layout import resolve_checkpoint

    load = cfg.checkpoint.load
    if not load:
        return None, None
    resuming_own = bool(cfg.checkpoint.save) and _same_path(load, cfg.checkpoint.save)
    if not Path(load).exists():
        if resuming_own:
            return None, f"no checkpoint in {load} yet: starting fresh from {cfg.model.path}"
        raise FileNotFoundError(f"checkpoint.load: {load} does not exist")
    ckpt = resolve_checkpoint(load)
    if ckpt is None:
        if resuming_own:
            return None, f"no checkpoint in {load} yet: starting fresh from {cfg.model.path}"
        raise FileNotFoundError(
            f"checkpoint.load: {load} holds no complete checkpoint (no 'latest' file; "
            "name an iter_NNNNNNN folder or a folder that training saved into)"
        )
    return ckpt, None


def _same_path(a: str, b: str) -> bool:
    return os.path.abspath(os.path.expanduser(a)) == os.path.abspath(os.path.expanduser(b))


def check_resume_compatible(cfg: Config, ckpt: Path) -> None:
    """The checkpoint's engine, sequence length, global batch and base model against the config."""
    state = json.loads((ckpt / "run_state.json").read_text())
    written_by = state.get("engine", "deepspeed")
    if written_by != cfg.distributed.engine:
        raise ValueError(
            f"{ckpt} was written by distributed.engine={written_by}, the config says "
            f"{cfg.distributed.engine}: an engine's checkpoint cannot be resumed by the other "
            "(convert it to a Hugging Face folder and start from that)"
        )
    if written_by == "deepspeed":
        _check_reshardable(cfg, ckpt, state)
    allowed = set(cfg.checkpoint.allow_changes)
    now = {
        "seq_length": cfg.data.seq_length,
        "global_batch_size": cfg.train.global_batch_size,
        "base_model": cfg.model.path,
    }
    for key, config_key in RESUME_KEYS.items():
        saved = state.get(key)
        if saved is None or key in allowed:
            continue
        same = _same_path(saved, now[key]) if key == "base_model" else saved == now[key]
        if not same:
            raise ValueError(
                f"{ckpt} was trained with {config_key}={saved!r}, the config says {now[key]!r}; "
                f"to change it deliberately, add checkpoint.allow_changes=[{key}]"
            )


def _check_reshardable(cfg: Config, ckpt: Path, state: dict[str, Any]) -> None:
    """A DeepSpeed checkpoint resumes with another process count, ZeRO stage or EP size through its
    resharded copy (`train.reshard`), except from ZeRO-0 (whole states, which DeepSpeed itself loads on any
    number of processes at stage 0 without expert parallelism)."""
    from moe_recipes.distributed.env import detect_env
    from moe_recipes.train import reshard

    d = cfg.distributed
    if reshard.needs_reshard(state, detect_env().world_size, d.zero_stage, d.expert_parallel_size):
        reshard.check_reshardable(ckpt, state)


def ineffective_settings(cfg: Config) -> list[str]:
    """One line per set key that the chosen combination ignores."""
    from moe_recipes.config import Config as Defaults

    d, t, defaults = cfg.distributed, cfg.train, Defaults()
    notes = []
    chunked_head = d.engine == "fsdp2" or d.zero_stage == 3
    if chunked_head and t.loss_kernel != defaults.train.loss_kernel:
        where = "FSDP2" if d.engine == "fsdp2" else "ZeRO-3"
        notes.append(
            f"train.loss_kernel={t.loss_kernel} has no effect under {where}, "
            "which recomputes the LM head's chunks in the backward pass instead of the fused kernel"
        )
    if d.engine == "fsdp2" and d.zero_stage != defaults.distributed.zero_stage:
        notes.append(
            f"distributed.zero_stage={d.zero_stage} has no effect with distributed.engine=fsdp2 "
            "(FSDP2 always shards parameters, gradients and optimizer states)"
        )
    if cfg.data.format == "chat":
        for key in ("reset_position_ids", "reset_attention_mask", "cache_dir"):
            if getattr(cfg.data, key) != getattr(defaults.data, key):
                notes.append(
                    f"data.{key} applies to pre-training data only and has no effect with data.format=chat"
                    + (" (data.packing keeps attention inside each conversation)" if "reset" in key else "")
                )
    return notes


def report(result: Preflight, is_main: bool) -> None:
    """Print the warnings and notes once (rank 0), on stderr."""
    if not is_main:
        return
    for line in result.warnings:
        print(f"[moe-recipes] warning: {line}", file=sys.stderr, flush=True)
    for line in result.notes:
        print(f"[moe-recipes] {line}", file=sys.stderr, flush=True)
