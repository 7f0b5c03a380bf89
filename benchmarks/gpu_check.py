"""GPU readiness check: `moe-recipes train` against Hugging Face `Trainer` on one CUDA device, full size.

`train_throughput.py` measures both trainers on 2 CPU cores with a tiny model; this script asks the
questions only a GPU answers: do both train a model that fills the device, in bf16, and what are the
tokens/s, MFU and peak device memory of each, side by side, with the ratios ours/HF.

What runs (one GPU, each contender one process of its own, one after the other):

* the model: Mixtral-style (8 experts, top-2, hidden 2048, 16 layers, 16 heads and 4 key/value heads,
  Mixtral's 32k tokenizer from `demo/tokenizer`), written once by `init_model` so both load the same
  weights. Unless `--expert-intermediate` is given, the expert width is sized from the device's memory
  (`torch.cuda.get_device_properties(0).total_memory`): the largest multiple of 256 for which the
  project's memory plan (`moe_recipes.train.plan`: parameters, gradients, AdamW moments, activations,
  LM-head buffers of our engine) stays within `--fill` (default 0.70) of the device. The remaining 30%
  is the margin for HF Trainer, which materialises the full logits, and for the CUDA context and the
  allocator. The weights are initialised on the GPU and saved in bf16 (a CPU init of ~6 B parameters
  takes minutes; the bf16 file is half the size to write and to read); both trainers load them as
  fp32 master weights.
* the data: the English Debian Reference from `demo/corpus`, tokenized once; both read the same windows
  of the sample index our trainer builds (see `_hf_trainer_baseline.py`).
* the step: global batch --batch of --seq tokens in one micro-batch, AdamW (same hyper-parameters),
  clipping 1.0, constant LR, bf16 autocast, sdpa attention (flash_attention_2 when it is installed),
  activation checkpointing on both (ours `train.activation_checkpointing`, HF `gradient_checkpointing`;
  `--no-activation-checkpointing` turns it off for both).
* ours: `--engine fsdp2` (default: on one GPU its bf16 parameters make the experts' grouped GEMMs run
  in bf16, while DeepSpeed keeps fp32 parameters and the experts then run in fp32 under autocast, as
  they do in HF Trainer) or `deepspeed` (ZeRO-0).

Reported: tokens/s from the median step after --warmup steps, MFU = tokens/s x training FLOPs per token
(`models.inspect.flops_per_token`, the formula our metrics use, applied to both) / the device's bf16
peak (`train.metrics.device_peak_tflops`, or --peak-tflops), and peak device memory as each process
reports it (`torch.cuda.max_memory_allocated()` through `train.metrics.peak_memory_gb`, the same call
on both sides), next to our plan's estimate. `--out FILE` writes the same as JSON.

The parent process never touches CUDA: the device is probed, and the model initialised, in child
processes, so each contender has the whole device to itself.

Without a CUDA device it exits with code 2, unless --allow-cpu is given: then the same code path runs on
the CPU at a tiny size (2 layers, hidden 64, expert width 64, seq 64, 4 steps) to check the plumbing.

    python benchmarks/gpu_check.py [--workdir DIR] [--out gpu_check.json] [--engine fsdp2|deepspeed]
        [--expert-intermediate N | --fill 0.70] [--steps 30] [--seq 2048] [--batch 4]
    python benchmarks/gpu_check.py --allow-cpu --out cpu_dry_run.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from train_throughput import Result, Setup, build_index, job_env, ours_overrides, run_hf, run_job, run_ours

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "demo" / "tokenizer"
CORPUS = REPO / "demo" / "corpus" / "debian-reference.en.jsonl"
EXIT_NO_GPU = 2
WIDTH_STEP = 256  # expert widths are sized in multiples of this (GEMM-friendly)

# Defaults per device kind; any size flag given on the command line wins.
GPU_SIZES = {"layers": 16, "hidden": 2048, "heads": 16, "kv_heads": 4, "expert_intermediate": None}
GPU_SIZES |= {"seq": 2048, "batch": 4, "steps": 30, "warmup": 5}
CPU_SIZES = {"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2, "expert_intermediate": 64}
CPU_SIZES |= {"seq": 64, "batch": 2, "steps": 4, "warmup": 1}


@dataclass
class Device:
    """What the child probe saw: the device both contenders train on and the software around it."""

    cuda: bool
    name: str
    total_gb: float  # device memory (GiB); host memory on the CPU
    capability: str
    torch: str
    cuda_version: str | None
    transformers: str
    deepspeed: str | None
    flash_attn_2: bool
    peak_tflops: float | None  # bf16 dense peak, None when the device is not in our table


def probe_device(out: str) -> None:
    """Runs in a child process: write the Device as JSON to `out`."""
    import os

    import torch
    import transformers
    from transformers.utils import is_flash_attn_2_available

    from moe_recipes.train.metrics import device_peak_tflops

    try:
        import deepspeed

        ds_version = deepspeed.__version__
    except ImportError:
        ds_version = None
    cuda = torch.cuda.is_available()
    if cuda:
        props = torch.cuda.get_device_properties(0)
        name, total, capability = props.name, props.total_memory, f"{props.major}.{props.minor}"
    else:
        name, capability = platform.processor() or platform.machine(), "-"
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    device = Device(
        cuda=cuda,
        name=name,
        total_gb=total / 2**30,
        capability=capability,
        torch=torch.__version__,
        cuda_version=torch.version.cuda,
        transformers=transformers.__version__,
        deepspeed=ds_version,
        flash_attn_2=cuda and is_flash_attn_2_available(),
        peak_tflops=device_peak_tflops(),
    )
    Path(out).write_text(json.dumps(asdict(device)))


def run_child(code: str, log: Path, timeout: float) -> None:
    """Run Python `code` in a child process with the contenders' environment (benchmarks/ importable)."""
    run_job([sys.executable, "-c", code], job_env(1), log, timeout)


def read_device(workdir: Path, timeout: float) -> Device:
    path = workdir / "device.json"
    run_child(f"import gpu_check; gpu_check.probe_device({str(path)!r})", workdir / "probe.log", timeout)
    return Device(**json.loads(path.read_text()))


# ----------------------------------------------------------------------------------------------------------
# Sizing: the expert width that fills the device, by our memory plan
# ----------------------------------------------------------------------------------------------------------


def model_kwargs(args: argparse.Namespace, expert_intermediate: int) -> dict:
    """`init_model` arguments of the checked model (Mixtral family, as the docstring says)."""
    return {
        "arch": "mixtral",
        "hidden_size": args.hidden,
        "expert_intermediate_size": expert_intermediate,
        "num_layers": args.layers,
        "num_heads": args.heads,
        "num_kv_heads": args.kv_heads,
        "num_experts": args.experts,
        "top_k": args.top_k,
        "max_position_embeddings": max(4096, args.seq),
    }


def hf_config(args: argparse.Namespace, expert_intermediate: int, vocab_size: int):
    """The transformers config `init_model` would write (for the meta model of the plan)."""
    from moe_recipes.models.init import build_config, make_dims

    kwargs = model_kwargs(args, expert_intermediate)
    arch = kwargs.pop("arch")
    return build_config(arch, make_dims(arch, **kwargs), vocab_size=vocab_size)


def plan_bytes(args: argparse.Namespace, cfg, expert_intermediate: int, vocab_size: int, memory_gb: float):
    """Our plan of one GPU training the model with `expert_intermediate`-wide experts."""
    from moe_recipes.train.plan import Hardware, plan

    hardware = Hardware(gpus_per_node=1, nodes=1, gpu_memory_gb=memory_gb)
    return plan(cfg, hf_config(args, expert_intermediate, vocab_size), hardware)


def size_experts(args: argparse.Namespace, cfg, vocab_size: int, memory_gb: float) -> int:
    """The widest multiple of WIDTH_STEP whose plan stays within `args.fill` of `memory_gb` (bisection:
    memory grows with the width)."""
    budget = args.fill * memory_gb * 2**30
    lo, hi = 1, 256  # in units of WIDTH_STEP; 256 x 256 = 65536 is far beyond any single device
    if plan_bytes(args, cfg, lo * WIDTH_STEP, vocab_size, memory_gb).device_total > budget:
        raise ValueError(
            f"even {WIDTH_STEP}-wide experts do not fit in {args.fill:.0%} of {memory_gb:.0f} GiB: "
            "use fewer --layers or a smaller --hidden, --seq or --batch"
        )
    while hi - lo > 1:
        mid = (lo + hi) // 2
        fits = plan_bytes(args, cfg, mid * WIDTH_STEP, vocab_size, memory_gb).device_total <= budget
        lo, hi = (mid, hi) if fits else (lo, mid)
    return lo * WIDTH_STEP


# ----------------------------------------------------------------------------------------------------------
# Assets: data and model (built once per work dir)
# ----------------------------------------------------------------------------------------------------------


def prepare_data(workdir: Path) -> str:
    """Tokenize the demo corpus with the demo (Mixtral) tokenizer, once; return the dataset prefix."""
    from moe_recipes.data.prepare import output_prefix_for, prepare_dataset

    out = workdir / "data" / "debian-en"
    prefix = output_prefix_for(out, "text")
    if not Path(f"{prefix}.idx").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        stats = prepare_dataset([str(CORPUS)], str(TOKENIZER), str(out), append_eod=True)
        print(f"prepared {stats.documents} documents, {stats.tokens} tokens -> {prefix}", flush=True)
    return prefix


def prepare_model(workdir: Path, kwargs: dict, device: Device, timeout: float) -> tuple[str, float]:
    """Write the model folder (once) in a child process, on the GPU when there is one, in bf16.

    Returns the folder and the seconds it took (0 when it was already there)."""
    name = "_".join(f"{k}{v}" for k, v in kwargs.items() if k != "arch")
    out = workdir / f"mixtral_{name}"
    if (out / "config.json").is_file():
        return str(out), 0.0
    full = {
        **kwargs,
        "tokenizer_dir": str(TOKENIZER),
        "output_dir": str(out),
        "seed": 0,
        "dtype": "bf16",
        "overwrite": True,
        "device": "cuda" if device.cuda else "cpu",
    }
    code = f"from moe_recipes.models.init import init_model; init_model(**{full!r})"
    start = time.perf_counter()
    run_child(code, workdir / "init_model.log", timeout)
    seconds = time.perf_counter() - start
    print(f"wrote model {out} in {seconds:.0f} s", flush=True)
    return str(out), seconds


# ----------------------------------------------------------------------------------------------------------
# The two contenders
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Contender:
    """One contender's numbers for the table and the JSON summary."""

    name: str
    tokens_per_s: float
    mfu: float | None
    peak_gb: float  # as its process reports it: CUDA max allocated on a GPU, peak RSS on the CPU
    first_loss: float | None
    wall_s: float  # the whole process: start-up, model load, all steps
    step_times: list[float]
    note: str


def contender(result: Result, flops_per_token: float, peak_tflops: float | None, wall_s: float) -> Contender:
    """MFU from the median tokens/s and the same FLOPs per token for both contenders."""
    mfu = result.tokens_per_s * flops_per_token / (peak_tflops * 1e12) if peak_tflops else None
    return Contender(
        result.contender,
        result.tokens_per_s,
        mfu,
        result.reported_peak_gb if result.reported_peak_gb is not None else result.peak_gb,
        result.first_loss,
        wall_s,
        result.step_times,
        result.note,
    )


def ours_extra(args: argparse.Namespace, attention: str) -> tuple[str, ...]:
    """Our overrides beyond train_throughput's: attention, checkpointing, the MFU peak."""
    extra = [
        f"model.attn_implementation={attention}",
        f"train.activation_checkpointing={str(args.activation_checkpointing).lower()}",
    ]
    if args.peak_tflops:
        extra.append(f"log.peak_tflops={args.peak_tflops}")
    return tuple(extra)


def hf_extra(args: argparse.Namespace, attention: str) -> tuple[str, ...]:
    """The HF helper's options for the same attention and checkpointing."""
    return ("--attn-implementation", attention) + (
        ("--gradient-checkpointing",) if args.activation_checkpointing else ()
    )


def run_contenders(
    setup: Setup, args: argparse.Namespace, attention: str, flops_per_token: float, peak_tflops: float | None
) -> list[Contender]:
    """Ours, then HF Trainer: one process each, bf16, on the same model, samples and optimizer."""
    out = []
    for name in ("ours", "HF Trainer"):
        print(f"== {name}", flush=True)
        start = time.perf_counter()
        if name == "ours":
            result = run_ours(setup, 1, "bf16", args.engine, ours_extra(args, attention))
        else:
            result = run_hf(setup, 1, "bf16", deepspeed=False, extra_argv=hf_extra(args, attention))
        out.append(contender(result, flops_per_token, peak_tflops, time.perf_counter() - start))
        c = out[-1]
        print(
            f"  {c.name}: {c.tokens_per_s:.0f} tokens/s, peak {c.peak_gb:.2f} GiB, {c.wall_s:.0f} s in all, "
            f"step times {[round(t, 3) for t in c.step_times]}",
            flush=True,
        )
    return out


# ----------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------


def _pct(value: float | None) -> str:
    return f"{100 * value:.1f}%" if value is not None else "-"


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "-"


def format_table(results: list[Contender], planned_gb: float) -> str:
    """The side-by-side table and one line of ratios ours/HF."""
    head = f"| {'contender':<20} | tokens/s (median) |    MFU | peak GiB | loss step 1 | process s | notes"
    lines = [head, "|" + "|".join("-" * len(c) for c in head.split("|")[1:])]
    for c in results:
        loss = f"{c.first_loss:.4f}" if c.first_loss is not None else "-"
        lines.append(
            f"| {c.name:<20} | {c.tokens_per_s:>17.0f} | {_pct(c.mfu):>6} | {c.peak_gb:>8.2f} | {loss:>11} | "
            f"{c.wall_s:>9.0f} | {c.note}"
        )
    ours, hf = results
    lines += [
        "",
        f"ours/HF: tokens/s {_ratio(ours.tokens_per_s, hf.tokens_per_s)}, MFU {_ratio(ours.mfu, hf.mfu)}, "
        f"peak memory {_ratio(ours.peak_gb, hf.peak_gb)}; our plan's estimate of our peak {planned_gb:.2f} GiB "
        f"(measured/planned {_ratio(ours.peak_gb, planned_gb)})",
    ]
    return "\n".join(lines)


def print_header(device: Device, args: argparse.Namespace, shape: dict) -> None:
    kind = "GPU" if device.cuda else "CPU (--allow-cpu dry run)"
    print(
        f"\n{kind}: {device.name}, {device.total_gb:.1f} GiB, compute capability {device.capability}, "
        f"bf16 peak {device.peak_tflops or '?'} TFLOP/s\n"
        f"torch {device.torch}, CUDA {device.cuda_version or '-'}, transformers {device.transformers}, "
        f"deepspeed {device.deepspeed or '-'}, flash_attn_2 {'yes' if device.flash_attn_2 else 'no'}\n"
        f"model: Mixtral-style, {args.layers} layers, hidden {args.hidden}, {args.experts} experts top-"
        f"{args.top_k} of width {shape['expert_intermediate']} ({shape['width_source']}), "
        f"{shape['total_params'] / 1e6:,.1f} M parameters ({shape['active_params'] / 1e6:,.1f} M active), "
        f"{shape['flops_per_token'] / 1e6:,.1f} MFLOP/token (training)\n"
        f"run: seq {args.seq}, batch {args.batch}, {args.steps} steps (median of the last "
        f"{args.steps - args.warmup}), bf16, attention {shape['attention']}, activation checkpointing "
        f"{'on' if args.activation_checkpointing else 'off'}, ours on {shape['engine']}\n"
    )


# ----------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--workdir", default=None, help="where data, model and runs are kept (default: a temp dir)"
    )
    p.add_argument("--out", default=None, help="also write the summary as JSON to this file")
    p.add_argument("--allow-cpu", action="store_true", help="without CUDA, dry-run on the CPU at a tiny size")
    p.add_argument(
        "--engine",
        choices=["fsdp2", "deepspeed"],
        default="fsdp2",
        help="our engine: fsdp2 (default; bf16 parameters in compute) or deepspeed (ZeRO-0)",
    )
    p.add_argument(
        "--activation-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="recompute decoder layers in backward, for both contenders (default: on)",
    )
    p.add_argument(
        "--expert-intermediate",
        type=int,
        default=None,
        help="expert width (default on a GPU: sized from the device memory, see --fill)",
    )
    p.add_argument(
        "--fill",
        type=float,
        default=0.70,
        help="fraction of the device memory our plan may use when sizing the experts (default: 0.70)",
    )
    p.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak for MFU if not in our table")
    for key in ("layers", "hidden", "heads", "kv_heads", "seq", "batch", "steps", "warmup"):
        p.add_argument(f"--{key.replace('_', '-')}", type=int, default=None, help=f"default {GPU_SIZES[key]}")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--timeout", type=float, default=900, help="seconds allowed to each child process")
    return p.parse_args(argv)


def fill_defaults(args: argparse.Namespace, device: Device) -> None:
    """The GPU sizes on a GPU, the tiny ones on the CPU; flags given on the command line win."""
    for key, value in (GPU_SIZES if device.cuda else CPU_SIZES).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.warmup >= args.steps:
        raise ValueError(f"--warmup {args.warmup} must be smaller than --steps {args.steps}")


def model_shape(args: argparse.Namespace, cfg, device: Device, vocab_size: int) -> dict:
    """Expert width (given or sized), parameter counts, FLOPs per token and our plan, from the meta model."""
    from moe_recipes.models.inspect import count_parameters, flops_per_token
    from moe_recipes.train.plan import meta_model

    if args.expert_intermediate is None:
        width, source = (
            size_experts(args, cfg, vocab_size, device.total_gb),
            f"sized to {args.fill:.0%} of memory",
        )
    else:
        width, source = args.expert_intermediate, "--expert-intermediate"
    model = meta_model(hf_config(args, width, vocab_size))
    counts = count_parameters(model)
    memory_plan = plan_bytes(args, cfg, width, vocab_size, device.total_gb)
    return {
        "expert_intermediate": width,
        "width_source": source,
        "total_params": counts["total"],
        "active_params": counts["active"],
        "flops_per_token": flops_per_token(model, args.seq),
        "planned_gb": memory_plan.device_total / 2**30,
        "plan": {k: v / 2**30 for k, v in memory_plan.device.items()},
        "engine": memory_plan.engine,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="gpu_check_")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    device = read_device(workdir, args.timeout)
    if not device.cuda and not args.allow_cpu:
        print(
            "gpu_check: no CUDA device is available (torch.cuda.is_available() is False); run it on a machine "
            "with a GPU, or pass --allow-cpu to dry-run the same code path on the CPU at a tiny size",
            file=sys.stderr,
        )
        return EXIT_NO_GPU
    fill_defaults(args, device)
    from transformers import AutoTokenizer

    from moe_recipes.config import load_config

    vocab_size = len(AutoTokenizer.from_pretrained(str(TOKENIZER)))
    attention = "flash_attention_2" if device.flash_attn_2 else "sdpa"
    setup = Setup(
        workdir=workdir,
        model_dir="(written below)",
        data_path=prepare_data(workdir),
        cache_dir=str(workdir / "cache"),
        seq=args.seq,
        batch=args.batch,
        steps=args.steps,
        warmup=args.warmup,
        timeout=args.timeout,
    )
    # the config ours will run, for the plan (sizing and the estimate printed next to the measurement)
    cfg = load_config(
        None, ours_overrides(setup, 1, "bf16", workdir, args.engine, ours_extra(args, attention))
    )
    shape = model_shape(args, cfg, device, vocab_size)
    shape["attention"] = attention
    setup.model_dir, init_s = prepare_model(
        workdir, model_kwargs(args, shape["expert_intermediate"]), device, args.timeout
    )
    build_index(setup)
    print_header(device, args, shape)
    peak_tflops = args.peak_tflops or device.peak_tflops
    results = run_contenders(setup, args, attention, shape["flops_per_token"], peak_tflops)
    print()
    print_header(device, args, shape)
    print(format_table(results, shape["planned_gb"]))
    total_s = time.perf_counter() - started
    print(f"\nwhole check {total_s:.0f} s (model init and write {init_s:.0f} s); work dir {workdir}")
    if args.out:
        ours, hf = results
        summary = {
            "device": asdict(device),
            "args": vars(args),
            "model": shape,
            "results": [asdict(c) for c in results],
            "ratios_ours_over_hf": {
                "tokens_per_s": ours.tokens_per_s / hf.tokens_per_s,
                "mfu": ours.mfu / hf.mfu if ours.mfu and hf.mfu else None,
                "peak_memory": ours.peak_gb / hf.peak_gb,
            },
            "median_step_s": {c.name: statistics.median(c.step_times[args.warmup :]) for c in results},
            "seconds": {"total": total_s, "model_init": init_s},
        }
        Path(args.out).write_text(json.dumps(summary, indent=1))
        print(f"summary written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
