"""`moe-recipes upcycle`: its arguments, kept apart from `models.upcycle` so that building the command line
(and `--help`) does not import torch and transformers."""

from __future__ import annotations

import argparse

UPCYCLE_ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe")
DEFAULT_MAX_SHARD_SIZE = "50GB"  # transformers 5's save_pretrained default


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register `moe-recipes upcycle`."""
    p = sub.add_parser(
        "upcycle",
        help="turn a dense HF model into an MoE HF model (sparse / Drop-Upcycling)",
        description="Upcycle a dense Hugging Face model into an MoE one, streaming: each MoE tensor is made "
        "from the dense checkpoint (read lazily) and written shard by shard, so memory holds about one shard "
        "plus one MoE layer. The folder keeps the dense model's dtype and has the released layout that "
        "save_pretrained writes (per-expert tensors: Mixtral experts.E.w1/w2/w3, Qwen experts.E.gate_proj/"
        "up_proj/down_proj).",
    )
    p.add_argument(
        "--dense", required=True, help="dense Hugging Face model folder (Llama/Qwen2/Mistral-style)"
    )
    p.add_argument("--arch", required=True, choices=UPCYCLE_ARCHS, help="MoE family to write")
    p.add_argument("--experts", type=int, required=True, help="routed experts per layer")
    p.add_argument("--top-k", type=int, required=True, help="experts per token")
    p.add_argument("--drop-ratio", type=float, default=0.0, help="Drop-Upcycling: share of neurons re-drawn")
    p.add_argument("--seed", type=int, default=0, help="seed of the router init and the dropped neurons")
    p.add_argument("--output", required=True, help="folder to write (must be empty or absent)")
    p.add_argument(
        "--max-shard-size",
        default=DEFAULT_MAX_SHARD_SIZE,
        help="largest safetensors shard, e.g. 2GB or 500MB (default: %(default)s, as save_pretrained); "
        "peak memory is about one shard, so a smaller shard bounds memory",
    )
    p.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from moe_recipes.models.upcycle import upcycle

    out = upcycle(
        args.dense,
        args.arch,
        args.experts,
        args.top_k,
        args.output,
        args.drop_ratio,
        args.seed,
        args.max_shard_size,
    )
    print(
        f"[moe-recipes] upcycled {args.dense} -> {out} ({args.arch}, {args.experts} experts, top-{args.top_k})"
    )
    return 0
