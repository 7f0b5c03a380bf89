"""The `convert` subcommand (registered by `moe_recipes.cli` through `add_commands`)."""

from __future__ import annotations

import argparse


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register `moe-recipes convert`."""
    p = sub.add_parser(
        "convert",
        help="turn a training checkpoint into a Hugging Face model folder",
        description="Convert a checkpoint written by `moe-recipes train` (any ZeRO stage, any number of "
        "processes) into a folder that AutoModelForCausalLM.from_pretrained loads: config.json "
        "(the base model's, only its dtype field adapted when --dtype differs from it), "
        "safetensors shards with model.safetensors.index.json, generation_config.json and the "
        "tokenizer. Runs in one process without a GPU. With --base-model, CHECKPOINT may instead "
        "be a consolidated state dict (e.g. the output of DeepSpeed's zero_to_fp32.py).",
    )
    p.add_argument(
        "checkpoint",
        metavar="CHECKPOINT",
        help="SAVE_DIR/iter_NNNNNNN, or SAVE_DIR (its `latest` checkpoint); with --base-model: a "
        "state-dict file (.safetensors, .bin, .pt) or a folder holding one (sharded or not)",
    )
    p.add_argument(
        "--output",
        metavar="HF_DIR",
        default=None,
        help="output folder (default: CHECKPOINT/hf; required with --base-model)",
    )
    p.add_argument(
        "--dtype",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="dtype of the saved weights (default auto: the dtype named in the base config.json, "
        "which is then copied unchanged)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument(
        "--max-shard-size",
        default="2GB",
        metavar="SIZE",
        help="largest safetensors shard, e.g. 2GB, 500MB, 4GiB (default: 2GB)",
    )
    p.add_argument(
        "--base-model",
        metavar="HF_DIR",
        default=None,
        help="treat CHECKPOINT as a consolidated state dict and take config and tokenizer from "
        "this Hugging Face folder (a `model.` prefix on the keys is stripped)",
    )
    p.set_defaults(handler=_run_convert)


def _run_convert(args: argparse.Namespace) -> int:
    from moe_recipes.convert.hf import convert_checkpoint, convert_state_dict

    if args.base_model:
        if not args.output:
            raise ValueError("--output is required when converting a state dict with --base-model")
        out = convert_state_dict(
            args.checkpoint,
            args.base_model,
            args.output,
            dtype=args.dtype,
            overwrite=args.overwrite,
            max_shard_size=args.max_shard_size,
            progress=True,
        )
    else:
        out = convert_checkpoint(
            args.checkpoint,
            args.output,
            dtype=args.dtype,
            overwrite=args.overwrite,
            max_shard_size=args.max_shard_size,
            progress=True,
        )
    print(out)
    return 0
