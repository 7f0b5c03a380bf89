"""The `generate` and `eval` subcommands (registered by `moe_recipes.cli` through `add_commands`)."""

from __future__ import annotations

import argparse

DEVICE_MAP_HELP = (
    "how the model is placed: 'none' puts it whole on one device (--device); 'auto' lets accelerate spread "
    "its layers over the visible GPUs, then CPU memory, as from_pretrained(device_map='auto') does, for a "
    "model larger than one GPU; the inputs go to the device of its embedding. With several GPUs visible "
    "'auto' splits even a small model across them (name --device, or set CUDA_VISIBLE_DEVICES, to keep it "
    "on one). Default: auto when a GPU is visible and --device is not given, else none"
)


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register `moe-recipes generate` and `moe-recipes eval`."""
    _add_generate(sub)
    _add_eval(sub)


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text with a Hugging Face model folder",
        description="Continue a prompt with a Hugging Face model folder (e.g. one written by "
        "`moe-recipes convert`), printing tokens as they are produced. Runs in bf16 "
        "where the device computes it natively and in fp32 elsewhere, unless --dtype says otherwise.",
    )
    p.add_argument(
        "model_dir", metavar="MODEL_DIR", help="Hugging Face model folder (config, weights, tokenizer)"
    )
    p.add_argument("--prompt", required=True, help="text to continue (or, with --chat, the user message)")
    p.add_argument(
        "--max-new-tokens", type=int, default=128, help="tokens to generate at most (default: 128)"
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="sampling temperature; 0 (the default) is greedy decoding",
    )
    p.add_argument(
        "--top-p",
        type=float,
        default=1.0,
        help="nucleus sampling: keep the smallest set of tokens whose probability reaches P "
        "(with --temperature > 0; default: 1.0, off)",
    )
    p.add_argument(
        "--chat",
        action="store_true",
        help="send the prompt as a user message through the tokenizer's chat template",
    )
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling (default: not seeded)")
    p.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda:0 (default: a GPU if any)")
    p.add_argument(
        "--dtype",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="weight dtype (default auto: bf16 where the device computes it natively: GPUs with bf16 units, "
        "CPUs with AVX-512-BF16 or AMX; fp32 elsewhere)",
    )
    p.add_argument("--device-map", choices=["none", "auto"], default=None, help=DEVICE_MAP_HELP)
    p.set_defaults(handler=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    from moe_recipes.infer.generate import generate_text

    generate_text(
        args.model_dir,
        prompt=args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        chat=args.chat,
        seed=args.seed,
        stream=True,
        device=args.device,
        dtype=args.dtype,
        device_map=args.device_map,
    )
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="perplexity of a Hugging Face model folder on a prepared dataset",
        description="Mean token loss and perplexity on one split of an indexed dataset, with "
        "the samples and loss computation of `moe-recipes train`. To reproduce the "
        "trainer's valid_loss of a checkpoint, pass the run's data.split, "
        "data.seq_length and train.seed, and --max-samples eval.iters x "
        "train.global_batch_size.",
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="Hugging Face model folder")
    p.add_argument(
        "--data",
        required=True,
        nargs="+",
        metavar="PREFIX",
        help="dataset prefix (path without .bin/.idx), or a blend: WEIGHT PREFIX WEIGHT PREFIX ...",
    )
    p.add_argument("--seq-length", type=int, default=2048, help="tokens per sample (default: 2048)")
    p.add_argument(
        "--max-samples",
        type=int,
        default=None,
        help="evaluate the first N samples of the split (default: one pass over the split)",
    )
    p.add_argument("--split", default="969,30,1", help="train,valid,test proportions (default: 969,30,1)")
    p.add_argument(
        "--seed", type=int, default=1234, help="data shuffling seed, the run's train.seed (default: 1234)"
    )
    p.add_argument(
        "--which",
        choices=["valid", "train", "test"],
        default="valid",
        help="which split to evaluate (default: valid)",
    )
    p.add_argument("--batch-size", type=int, default=1, help="samples per forward pass (default: 1)")
    p.add_argument(
        "--cache-dir",
        default=None,
        help="where sample indices are cached (default: a cache/ folder beside the data)",
    )
    p.add_argument(
        "--reset-position-ids",
        action="store_true",
        help="restart positions at every document (as data.reset_position_ids)",
    )
    p.add_argument(
        "--reset-attention-mask",
        action="store_true",
        help="keep attention inside each document (as data.reset_attention_mask)",
    )
    p.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="compute precision: bf16 autocast over fp32 weights, or fp32 (default auto: bf16 where the "
        "device computes it natively, fp32 elsewhere)",
    )
    p.add_argument(
        "--dtype",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="weight dtype (default auto: bf16 on a GPU when --precision resolves to bf16, which halves the "
        "memory of a large model; fp32 on CPU and under fp32). fp32 weights under bf16 autocast compute "
        "exactly as training does and reproduce a run's valid_loss",
    )
    p.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda:0 (default: a GPU if any)")
    p.add_argument("--device-map", choices=["none", "auto"], default=None, help=DEVICE_MAP_HELP)
    p.set_defaults(handler=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    from moe_recipes.infer.perplexity import evaluate_perplexity

    data = args.data[0] if len(args.data) == 1 else args.data
    result = evaluate_perplexity(
        args.model_dir,
        data,
        seq_length=args.seq_length,
        max_samples=args.max_samples,
        split=args.split,
        seed=args.seed,
        which=args.which,
        batch_size=args.batch_size,
        cache_dir=args.cache_dir,
        reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask,
        precision=args.precision,
        device=args.device,
        dtype=args.dtype,
        device_map=args.device_map,
    )
    print(result.summary(args.which))
    return 0
