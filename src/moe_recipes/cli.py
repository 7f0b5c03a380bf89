"""The `moe-recipes` command: subcommands only. Each one parses, validates and calls one function.

Heavy imports (torch, transformers, deepspeed) happen inside the handlers so that `--help`
answers instantly.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

# Back large CPU tensors with transparent huge pages (read by PyTorch's CPU allocator at its first
# allocation, so set before torch is imported). Tensors of 100+ MB are allocated and freed every step (the
# LM head's logits and gradients, DeepSpeed's flat buffers); with 4 KiB pages each fresh allocation costs a
# page fault per page, 3-5x the time of the work done in it. Set THP_MEM_ALLOC_ENABLE=0 to turn this off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

Handler = Callable[[argparse.Namespace], int | None]


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare",
        help="tokenize JSONL, Parquet or datasets folders into a Megatron-compatible indexed dataset (.bin/.idx)",
        description=(
            "Tokenize documents into PREFIX_<key>_document.bin/.idx, byte-compatible with Megatron-LM's MMIDIDX "
            "indexed dataset. Inputs, detected from their first bytes and mixed freely: JSON lines (.jsonl/.json, "
            "plain, gzip or zstd), Parquet (the --json-key column; other columns are not read), Arrow IPC files "
            "and `datasets` save_to_disk folders. Plain JSON lines are split by byte ranges, Parquet by row "
            "groups and Arrow by record batches across --workers; compressed JSON lines are decompressed by the "
            "parent. Every document starts with the tokenizer's BOS token when it has one (whether or not the "
            "tokenizer adds it by itself); --no-bos turns this off."
        ),
    )
    p.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="FILE",
        help="files, datasets folders or glob patterns (quote globs so the shell leaves them alone)",
    )
    p.add_argument("--tokenizer", required=True, metavar="DIR", help="Hugging Face tokenizer folder")
    p.add_argument(
        "--output-prefix",
        required=True,
        metavar="PREFIX",
        help="output path prefix; files are PREFIX_<json-key>_document.{bin,idx}",
    )
    p.add_argument(
        "--json-key", default="text", help="JSON key or Parquet/Arrow column holding the text (default: text)"
    )
    p.add_argument(
        "--append-eod",
        action="store_true",
        help="append the tokenizer's EOS id to every document (needed for pre-training)",
    )
    p.add_argument(
        "--no-bos",
        dest="bos",
        action="store_false",
        help="do not put the BOS token at the start of each document",
    )
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (default: 1)")
    p.add_argument(
        "--skip-bad-lines",
        action="store_true",
        help="skip lines or rows that are not JSON, lack the key (column), hold a null or non-string or "
        "invalid UTF-8, and count them (default: stop with an error naming the file and line or row)",
    )
    p.add_argument(
        "--no-word-cache",
        dest="word_cache",
        action="store_false",
        help="encode with the tokenizer's own pipeline only (slower). By default words are looked up in a "
        "per-worker cache in front of it, for tokenizers where that gives exactly the same ids "
        "(checked at start and on one document of every chunk)",
    )
    p.set_defaults(handler=_run_prepare)


def _run_prepare(args: argparse.Namespace) -> int:
    from moe_recipes.data.prepare import prepare_dataset

    stats = prepare_dataset(
        inputs=args.input,
        tokenizer_dir=args.tokenizer,
        output_prefix=args.output_prefix,
        json_key=args.json_key,
        append_eod=args.append_eod,
        add_bos=args.bos,
        workers=args.workers,
        skip_bad_lines=args.skip_bad_lines,
        word_cache=args.word_cache,
    )
    print(stats.summary())
    return 0


def _add_data_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "data-info",
        help="print statistics and a decoded sample of an indexed dataset",
        description="Print documents, tokens, dtype, the largest token id and a decoded "
        "sample of PREFIX.{bin,idx}. Given several prefixes (or --ratio), print each one's tokens and a "
        "ready-to-paste data.path blend weighted by tokens, or by the --ratio values.",
    )
    p.add_argument("prefix", nargs="+", help="dataset prefix(es) (path without .bin/.idx)")
    p.add_argument(
        "--ratio",
        type=float,
        nargs="+",
        metavar="R",
        help="blend weights, one per prefix (normalised), instead of each prefix's share of the tokens",
    )
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer folder used to decode the sample")
    p.add_argument("--sample-index", type=int, default=0, help="which document to decode (default: 0)")
    p.add_argument("--sample-tokens", type=int, default=64, help="how many tokens to decode (default: 64)")
    p.set_defaults(handler=_run_data_info)


def _run_data_info(args: argparse.Namespace) -> int:
    from moe_recipes.data.info import blend_report, data_info

    if len(args.prefix) > 1 or args.ratio is not None:
        print(blend_report(args.prefix, args.ratio))
        return 0
    print(
        data_info(
            args.prefix[0],
            tokenizer_dir=args.tokenizer,
            sample_index=args.sample_index,
            sample_tokens=args.sample_tokens,
        )
    )
    return 0


def _add_init_model(sub: argparse._SubParsersAction) -> None:
    from moe_recipes.models.init import ARCHITECTURES

    p = sub.add_parser(
        "init-model",
        help="write a randomly initialised Hugging Face model folder",
        description="Write a randomly initialised HF model (config, safetensors, tokenizer) "
        "of the given architecture, sized by the flags; for demos and tests.",
    )
    p.add_argument("--arch", required=True, choices=sorted(ARCHITECTURES), help="model architecture")
    p.add_argument("--tokenizer", required=True, metavar="DIR", help="tokenizer folder to copy in")
    p.add_argument("--output", required=True, metavar="DIR", help="output folder")
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument(
        "--intermediate-size",
        type=int,
        default=None,
        help="dense MLP width (default: 2x hidden); MoE expert width is --expert-intermediate-size",
    )
    p.add_argument(
        "--expert-intermediate-size",
        type=int,
        default=None,
        help="width of each expert's MLP (default: hidden size)",
    )
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: --heads)")
    p.add_argument("--experts", type=int, default=8, help="routed experts per MoE layer")
    p.add_argument("--top-k", type=int, default=2, help="experts per token")
    p.add_argument(
        "--shared-experts", type=int, default=None, help="shared experts (architectures that have them)"
    )
    p.add_argument("--max-position-embeddings", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="dtype of the saved weights")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(handler=_run_init_model)


def _run_init_model(args: argparse.Namespace) -> int:
    from moe_recipes.models.init import init_model

    out = init_model(
        arch=args.arch,
        tokenizer_dir=args.tokenizer,
        output_dir=args.output,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        expert_intermediate_size=args.expert_intermediate_size,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        num_experts=args.experts,
        top_k=args.top_k,
        num_shared_experts=args.shared_experts,
        max_position_embeddings=args.max_position_embeddings,
        seed=args.seed,
        dtype=args.dtype,
        overwrite=args.overwrite,
    )
    print(out)
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="(continual) pre-train or instruction-tune a Hugging Face model",
        description="Train from a YAML config. Extra KEY=VALUE arguments override config keys by their "
        "dotted names (e.g. train.iters=100 optim.lr=1e-4). The resolved config is validated "
        "before anything starts and saved with every checkpoint. `moe-recipes train --show-keys` "
        "lists every key with its default and meaning.",
    )
    p.add_argument("config", nargs="?", help="YAML config file")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    p.add_argument(
        "--resume",
        action="store_true",
        help="resume from the latest complete checkpoint in checkpoint.save "
        "(same as checkpoint.load=<checkpoint.save>)",
    )
    p.add_argument("--show-keys", action="store_true", help="list all config keys and exit")
    p.set_defaults(handler=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from moe_recipes.config import describe_keys, load_config

    if args.show_keys:
        print(describe_keys())
        return 0
    if not args.config:
        raise SystemExit("moe-recipes train: a CONFIG.yaml is required (see --help)")
    cfg = load_config(args.config, args.overrides)
    if args.resume:
        if not cfg.checkpoint.save:
            raise SystemExit("--resume needs checkpoint.save to be set")
        cfg.checkpoint.load = cfg.checkpoint.save
    from moe_recipes.train.trainer import train

    return train(cfg)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the whole job end to end on the bundled sample data",
        description="Prepare the bundled corpus, initialise a tiny Mixtral-architecture "
        "model, continually pre-train it on CPU, convert the checkpoint to a "
        "Hugging Face folder and generate text with it.",
    )
    p.add_argument("--workdir", default="demo_out", help="where everything is written (default: demo_out)")
    p.add_argument("--iters", type=int, default=None, help="training steps (default: the demo config's)")
    p.set_defaults(handler=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from moe_recipes.demo import run_demo

    return run_demo(args.workdir, iters=args.iters)


def _add_plan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="estimate the per-GPU memory of a training config and whether it fits",
        description="Estimate what one GPU holds at the peak of a training step of CONFIG (parameters, "
        "gradients, optimizer states, gathered layers, activations, LM-head buffers) for its engine, "
        "ZeRO stage or FSDP2 sharding, offload and precision, and say whether it fits with 10%% headroom. "
        "The model is built on the meta device from model.path/config.json, so no weights are needed. "
        "The hardware is not in the config: it is 1 node x 8 GPUs of 80 GiB unless --nodes, --gpus and "
        "--gpu-memory say otherwise. Exits 0 whether or not the run fits (the verdict is printed).",
    )
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    p.add_argument("--gpus", type=int, default=None, help="GPUs per node (default: 8)")
    p.add_argument("--nodes", type=int, default=None, help="nodes (default: 1)")
    p.add_argument("--gpu-memory", type=float, default=None, metavar="GB", help="GiB per GPU (default: 80)")
    p.add_argument("--json", action="store_true", help="print only the plan as JSON")
    p.set_defaults(handler=_run_plan)


def _run_plan(args: argparse.Namespace) -> int:
    from moe_recipes.config import load_config
    from moe_recipes.train.plan import Hardware, plan
    from moe_recipes.train.plan_report import format_json, format_plan

    cfg = load_config(args.config, args.overrides, validate=False)
    cfg.data.path = cfg.data.path or "unused"  # planning reads no data
    cfg.validate()
    given = {"gpus_per_node": args.gpus, "nodes": args.nodes, "gpu_memory_gb": args.gpu_memory}
    hardware = Hardware(**{k: v for k, v in given.items() if v is not None})
    defaults = {"gpus_per_node": "--gpus 8", "nodes": "--nodes 1", "gpu_memory_gb": "--gpu-memory 80"}
    assumed = ", ".join(defaults[k] for k, v in given.items() if v is None)
    result = plan(cfg, cfg.model.path, hardware)
    assumed = f"assumed {assumed}" if assumed else ""
    print(format_json(result, assumed) if args.json else format_plan(result, assumed))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe-recipes",
        description="Continual pre-training and instruction tuning of Mixture-of-Experts LLMs in Hugging "
        "Face format. Run `moe-recipes COMMAND --help` for each command's flags.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (_add_prepare, _add_data_info, _add_init_model, _add_train, _add_plan, _add_demo):
        add(sub)
    for add in _extra_commands():
        add(sub)
    return parser


def _extra_commands() -> list[Callable[[argparse._SubParsersAction], None]]:
    """Subcommands that live next to their implementation (convert, generate, eval, inspect, ...)."""
    from moe_recipes.convert.cli import add_commands as convert_commands
    from moe_recipes.data.inspect_cmd import add_commands as data_commands
    from moe_recipes.infer.cli import add_commands as infer_commands
    from moe_recipes.models.upcycle_cli import add_commands as upcycle_commands
    from moe_recipes.train.plot import add_commands as plot_commands

    return [convert_commands, infer_commands, data_commands, upcycle_commands, plot_commands]


def _drop_local_rank(argv: list[str]) -> list[str]:
    """The deepspeed launcher passes --local_rank=N before the subcommand; the rank comes from the env."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
        elif arg.startswith(("--local_rank=", "--local-rank=")):
            continue
        elif arg in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            skip = True
        else:
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(_drop_local_rank(sys.argv[1:] if argv is None else argv))
    # `train CONFIG --resume key=value`: overrides may also follow the flags
    if (
        extra
        and getattr(args, "overrides", None) is not None
        and all("=" in x and not x.startswith("-") for x in extra)
    ):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from moe_recipes.fileio import InUseError  # light: no torch

    try:
        rc = args.handler(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, ImportError, InUseError) as err:
        print(f"moe-recipes {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        from moe_recipes.fileio import is_out_of_space

        if not is_out_of_space(err):
            raise
        print(f"moe-recipes {args.command}: error: {err}", file=sys.stderr)
        return 1
    return int(rc or 0)


def run() -> None:
    """The `moe-recipes` command and `python -m moe_recipes.cli` (what launchers start)."""
    code = main()
    if "moe_recipes.distributed.env" in sys.modules:
        from moe_recipes.distributed.env import exit_process

        code = exit_process(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
