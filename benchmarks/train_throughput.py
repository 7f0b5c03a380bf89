"""Benchmark: training tokens/s and peak memory of `moe-recipes train` against Hugging Face `Trainer`.

Both contenders train the same tiny Qwen2-MoE (written once by `init_model`, so both start from the same
weights) with the 129k-vocabulary DeepSeek tokenizer on the same samples (the Debian Reference, English
and Japanese, prepared once with `prepare_dataset(append_eod=True)`): sequences of --seq tokens, global
batch --batch, AdamW with the same hyper-parameters, gradient clipping 1.0, constant learning rate, no
evaluation and no checkpoint. Configurations, each measured for both contenders in the same run:

* 1 process (torch threads 2): ours with `distributed.zero_stage=0`, HF Trainer plain;
* 2 processes under torchrun (1 thread each, micro batch --batch / 2): ours with ZeRO-2, HF Trainer with
  a DeepSpeed ZeRO-2 JSON when accelerate runs it on all processes, else plain DDP (said in the output);

each in fp32 and bf16 (ours `train.precision=bf16`, autocast; HF `bf16=True`). Ours runs on both engines
(DeepSpeed ZeRO, FSDP2) and, for 2 processes in bf16, also with `distributed.reduce_dtype=bf16` (gradients
reduced in bf16, as HF Trainer's DeepSpeed bf16 mode does; ours reduces fp32 by default). Every contender runs in
its own process tree, so peak memory is its own: the table's "peak GB/rank" is the largest resident set
of any process of that tree (from `os.wait4`), the same measure for both. tokens/s is global batch x seq
divided by the median step time after --warmup steps (and, less sensitive to other jobs on a shared
machine, by the fastest such step): ours from `log.dir/metrics.jsonl`, HF from a TrainerCallback
(on_step_begin to on_step_end; neither includes logging). The first-step losses are printed as a check
that both train the same model on the same data (they include the same load-balancing loss since ours
is HF's `load_balancing_loss_func` by default, `moe.aux_loss_type=hf`; results measured before that show
HF's ~0.001 higher, its loss being top_k x the per-layer one ours was then).

    .venv/bin/python benchmarks/train_throughput.py [--workdir DIR] [--steps 12] [--warmup 3]
        [--precisions fp32 bf16] [--procs 1 2] [--engines deepspeed fsdp2 deepspeed-bf16reduce]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.assets import CORPUS_EN, CORPUS_JA, DEEPSEEK_TOKENIZER  # noqa: E402
from tests.harness import JOB_VARS  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
SPEED_GOAL = 1.2  # ours / HF tokens/s, at least
MEMORY_GOAL = 0.7  # ours / HF peak memory per rank, at most
# DeepSpeed ZeRO with `distributed.reduce_dtype=bf16`: gradients reduced in bf16, as HF Trainer's DeepSpeed
# bf16 mode does; measured for multi-process bf16 only (elsewhere it is the same as "deepspeed").
BF16_REDUCE = "deepspeed-bf16reduce"


@dataclass
class Setup:
    """What both contenders share: files, sizes and optimizer hyper-parameters."""

    workdir: Path
    model_dir: str
    data_path: str
    cache_dir: str
    seq: int
    batch: int
    steps: int
    warmup: int
    timeout: float
    split: str = "969,30,1"
    seed: int = 1234
    lr: float = 3e-4
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0


@dataclass
class Result:
    """One contender in one configuration; step_times are all steps, warmup included."""

    contender: str
    processes: int
    precision: str
    step_times: list[float]
    tokens_per_step: int
    warmup: int
    peak_gb: float
    first_loss: float | None
    note: str = ""
    # what the contender's own process reports (`metrics.peak_memory_gb`: CUDA max allocated on a GPU, the
    # peak resident set elsewhere); for several processes, the largest of them
    reported_peak_gb: float | None = None

    @property
    def timed(self) -> list[float]:
        if len(self.step_times) <= self.warmup:
            raise ValueError(
                f"{self.contender} ran {len(self.step_times)} steps, not more than --warmup {self.warmup}"
            )
        return self.step_times[self.warmup :]

    @property
    def tokens_per_s(self) -> float:
        """From the median post-warmup step: the headline number."""
        return self.tokens_per_step / statistics.median(self.timed)

    @property
    def best_tokens_per_s(self) -> float:
        """From the fastest post-warmup step: less sensitive to other jobs on a shared machine."""
        return self.tokens_per_step / min(self.timed)


# ----------------------------------------------------------------------------------------------------------
# Assets: dataset, model, sample index (built once, cached in the work dir)
# ----------------------------------------------------------------------------------------------------------


def prepare_data(workdir: Path) -> str:
    """Tokenize both Debian Reference corpora with the DeepSeek tokenizer (once); return the prefix."""
    from moe_recipes.data.prepare import output_prefix_for, prepare_dataset

    inputs = [CORPUS_EN, CORPUS_JA]
    out = workdir / "data" / "debian"
    prefix = output_prefix_for(out, "text")
    if not Path(f"{prefix}.idx").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        stats = prepare_dataset([str(p) for p in inputs], str(DEEPSEEK_TOKENIZER), str(out), append_eod=True)
        print(f"prepared {stats.documents} documents, {stats.tokens} tokens -> {prefix}", flush=True)
    return prefix


def prepare_model(workdir: Path, args: argparse.Namespace) -> str:
    """Write the random Qwen2-MoE (once) that both contenders load."""
    from moe_recipes.models.init import init_model

    name = f"qwen2_moe_h{args.hidden}_l{args.layers}_e{args.experts}k{args.top_k}_i{args.expert_intermediate}"
    out = workdir / name
    if not (out / "config.json").is_file():
        init_model(
            arch="qwen2_moe",
            tokenizer_dir=str(DEEPSEEK_TOKENIZER),
            output_dir=str(out),
            hidden_size=args.hidden,
            expert_intermediate_size=args.expert_intermediate,
            num_layers=args.layers,
            num_heads=args.heads,
            num_experts=args.experts,
            top_k=args.top_k,
            num_shared_experts=1,
            max_position_embeddings=max(1024, args.seq),
            seed=0,
            overwrite=True,
        )
        print(f"wrote model {out}", flush=True)
    return str(out)


def build_index(setup: Setup) -> None:
    """Build the sample index both contenders load, so neither pays for building it in its run."""
    from moe_recipes.data.pretrain import build_pretrain_datasets

    build_pretrain_datasets(
        setup.data_path,
        setup.split,
        setup.seq,
        (setup.steps * setup.batch, 0, 0),
        seed=setup.seed,
        cache_dir=setup.cache_dir,
    )


# ----------------------------------------------------------------------------------------------------------
# Running one contender as its own process tree
# ----------------------------------------------------------------------------------------------------------


def job_env(processes: int) -> dict[str, str]:
    """Environment of a contender: 2 torch threads for one process, 1 per process for two."""
    env = {k: v for k, v in os.environ.items() if k not in JOB_VARS}
    threads = str(max(1, 2 // processes))
    env.update(
        OMP_NUM_THREADS=threads,
        MKL_NUM_THREADS=threads,
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=os.pathsep.join([str(BENCH_DIR), str(REPO / "src"), env.get("PYTHONPATH", "")]),
    )
    return env


def command(module: str, argv: list[str], processes: int) -> list[str]:
    """`python -m module argv` for one process, under torchrun for several."""
    if processes == 1:
        return [sys.executable, "-m", module, *argv]
    from tests.harness import free_port, launch_command

    return launch_command("torchrun", module, argv, processes, free_port())


def run_job(cmd: list[str], env: dict[str, str], log_path: Path, timeout: float) -> float:
    """Run `cmd` to the end (output to `log_path`); return the peak RSS in GB of its largest process.

    `os.wait4` reports the maximum resident set of the child and of every descendant it waited for
    (torchrun waits for its ranks), so this is the peak of the largest single process of the tree.
    The job runs in its own session, which is killed as a whole on a timeout or an interruption.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{' '.join(cmd)} still running after {timeout:g} s (log {log_path})")
            time.sleep(0.2)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        os.wait4(proc.pid, 0)
        proc.returncode = -signal.SIGKILL
        raise
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}; end of {log_path}:\n{tail}")
    return usage.ru_maxrss / 2**20  # KiB on Linux


def ours_overrides(
    setup: Setup,
    processes: int,
    precision: str,
    run_dir: Path,
    engine: str = "deepspeed",
    extra: tuple[str, ...] = (),
) -> list[str]:
    """`moe-recipes train` overrides for `setup`; `extra` comes last, so it wins over the rest."""
    engine_keys = (
        [f"distributed.zero_stage={0 if processes == 1 else 2}"]
        if engine.startswith("deepspeed")
        else ["distributed.engine=fsdp2"]
    )
    if engine == BF16_REDUCE:
        engine_keys.append("distributed.reduce_dtype=bf16")
    return [
        f"model.path={setup.model_dir}",
        f"data.path={setup.data_path}",
        f"data.split={setup.split}",
        f"data.seq_length={setup.seq}",
        f"data.cache_dir={setup.cache_dir}",
        "data.num_workers=0",
        f"train.micro_batch_size={setup.batch // processes}",
        f"train.global_batch_size={setup.batch}",
        f"train.iters={setup.steps}",
        f"train.precision={precision}",
        f"train.seed={setup.seed}",
        f"train.grad_clip={setup.grad_clip}",
        f"optim.lr={setup.lr}",
        f"optim.min_lr={setup.lr}",
        "optim.decay_style=constant",
        "optim.warmup_iters=0",
        f"optim.weight_decay={setup.weight_decay}",
        f"optim.beta1={setup.betas[0]}",
        f"optim.beta2={setup.betas[1]}",
        f"optim.eps={setup.eps}",
        "moe.z_loss_coef=0.0",
        "eval.interval=0",
        "eval.iters=0",
        "log.interval=1",
        f"log.dir={run_dir}",
        "log.tensorboard=false",
        "log.progress_bar=false",
        *engine_keys,
        *extra,
    ]


def run_ours(
    setup: Setup, processes: int, precision: str, engine: str = "deepspeed", extra: tuple[str, ...] = ()
) -> Result:
    """`moe-recipes train` with a generated YAML; step times and losses from its metrics.jsonl.

    `extra`: further `key=value` overrides (e.g. `train.activation_checkpointing=true`)."""
    from moe_recipes.config import load_config

    run_dir = setup.workdir / "runs" / f"ours_{engine}_{processes}p_{precision}"
    cfg = load_config(None, ours_overrides(setup, processes, precision, run_dir / "log", engine, extra))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "log" / "metrics.jsonl").unlink(missing_ok=True)
    config_path = run_dir / "config.yaml"
    cfg.save(config_path)
    peak = run_job(
        command("moe_recipes.cli", ["train", str(config_path)], processes),
        job_env(processes),
        run_dir / "console.log",
        setup.timeout,
    )
    records = [json.loads(line) for line in (run_dir / "log" / "metrics.jsonl").read_text().splitlines()]
    steps = sorted((r for r in records if "step_time" in r), key=lambda r: r["step"])
    times = [r["step_time"] for r in steps]
    sharding = f"ZeRO-{cfg.distributed.zero_stage}" if engine.startswith("deepspeed") else "FSDP2"
    if cfg.distributed.reduce_dtype != "fp32":
        sharding += f", gradients reduced in {cfg.distributed.reduce_dtype}"
    reported = max(r["peak_mem_gb"] for r in steps)
    note = f"{sharding}; rank 0 reports {reported:.2f} GB"
    first_loss = steps[0]["loss"] if steps else None
    tokens = setup.batch * setup.seq
    name = {"deepspeed": "moe-recipes", "fsdp2": "moe-recipes/fsdp2", BF16_REDUCE: "moe-recipes/bf16red"}[
        engine
    ]
    return Result(name, processes, precision, times, tokens, setup.warmup, peak, first_loss, note, reported)


def hf_deepspeed_json(run_dir: Path) -> Path:
    """ZeRO-2 with the options our engine uses; "auto" lets the Trainer fill in batch, clipping, bf16."""
    config = {
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "zero_optimization": {
            "stage": 2,
            "overlap_comm": False,
            "contiguous_gradients": True,
            "reduce_scatter": True,
        },
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
    }
    path = run_dir / "ds_zero2.json"
    path.write_text(json.dumps(config, indent=1))
    return path


def run_hf(
    setup: Setup, processes: int, precision: str, deepspeed: bool, extra_argv: tuple[str, ...] = ()
) -> Result:
    """The HF Trainer helper (`_hf_trainer_baseline.py`) in its own process tree.

    `extra_argv`: further helper options (e.g. `--gradient-checkpointing`)."""
    mode = "deepspeed" if deepspeed else ("ddp" if processes > 1 else "plain")
    run_dir = setup.workdir / "runs" / f"hf_{processes}p_{precision}_{mode}"
    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / "result"
    for old in run_dir.glob("result_rank*.json"):
        old.unlink()
    argv = [
        "--model",
        setup.model_dir,
        "--data-path",
        setup.data_path,
        "--split",
        setup.split,
        "--cache-dir",
        setup.cache_dir,
        "--seq",
        str(setup.seq),
        "--micro-batch",
        str(setup.batch // processes),
        "--global-batch",
        str(setup.batch),
        "--steps",
        str(setup.steps),
        "--precision",
        precision,
        "--seed",
        str(setup.seed),
        "--lr",
        str(setup.lr),
        "--weight-decay",
        str(setup.weight_decay),
        "--betas",
        *map(str, setup.betas),
        "--eps",
        str(setup.eps),
        "--grad-clip",
        str(setup.grad_clip),
        "--output-dir",
        str(run_dir / "trainer"),
        "--out",
        str(out),
        *extra_argv,
    ]
    if deepspeed:
        argv += ["--deepspeed", str(hf_deepspeed_json(run_dir))]
    peak = run_job(
        command("_hf_trainer_baseline", argv, processes),
        job_env(processes),
        run_dir / "console.log",
        setup.timeout,
    )
    ranks = [json.loads(p.read_text()) for p in sorted(run_dir.glob("result_rank*.json"))]
    rank0 = next(r for r in ranks if r["rank"] == 0)
    if any(r["accelerate_processes"] != processes for r in ranks):
        raise RuntimeError(
            f"HF Trainer ({mode}) ran as {rank0['accelerate_processes']} process(es) per job "
            f"instead of {processes}: {rank0['distributed_type']}"
        )
    note = (
        f"{mode}, {rank0['distributed_type']}, {rank0['optimizer']}, {rank0['threads']} thread(s); "
        f"ranks report {max(r['peak_rss_gb'] for r in ranks):.2f} GB"
    )
    first_loss = rank0["losses"][0] if rank0["losses"] else None
    tokens = setup.batch * setup.seq
    reported = max(r["peak_memory_gb"] for r in ranks)
    return Result(
        "HF Trainer",
        processes,
        precision,
        rank0["step_times"],
        tokens,
        setup.warmup,
        peak,
        first_loss,
        note,
        reported,
    )


def run_hf_multi(setup: Setup, processes: int, precision: str) -> Result:
    """HF Trainer with DeepSpeed ZeRO-2 if accelerate runs it on every process here, else plain DDP."""
    try:
        return run_hf(setup, processes, precision, deepspeed=True)
    except RuntimeError as err:
        reason = str(err).strip().splitlines()[0][:300]
        print(
            f"  HF Trainer + DeepSpeed ZeRO-2 did not run on {processes} processes ({reason}); "
            f"using plain DDP as the {processes}-process baseline",
            flush=True,
        )
    result = run_hf(setup, processes, precision, deepspeed=False)
    result.note = "DeepSpeed unavailable via accelerate on CPU -> " + result.note
    return result


# ----------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------


def format_table(results: list[Result]) -> str:
    """The results table followed by one ratio line per configuration."""
    head = (
        f"| {'contender':<19} | procs | precision | tokens/s (median) | tokens/s (best) | peak GB/rank "
        "| loss step 1 | notes"
    )
    lines = [head, "|" + "|".join("-" * len(c) for c in head.split("|")[1:])]
    for r in results:
        loss = f"{r.first_loss:.4f}" if r.first_loss is not None else "-"
        lines.append(
            f"| {r.contender:<19} | {r.processes:>5} | {r.precision:<9} | {r.tokens_per_s:>17.0f} | "
            f"{r.best_tokens_per_s:>15.0f} | {r.peak_gb:>12.2f} | {loss:>11} | {r.note}"
        )
    lines.append("")
    for key in dict.fromkeys((r.processes, r.precision) for r in results):
        pair = {r.contender: r for r in results if (r.processes, r.precision) == key}
        hf = pair.get("HF Trainer")
        for name, ours in pair.items():
            if hf is None or not name.startswith("moe-recipes"):
                continue
            speed, memory = ours.tokens_per_s / hf.tokens_per_s, ours.peak_gb / hf.peak_gb
            best = ours.best_tokens_per_s / hf.best_tokens_per_s
            met = "MET" if speed >= SPEED_GOAL and memory <= MEMORY_GOAL else "NOT met"
            lines.append(
                f"{key[0]} process(es), {key[1]}, {name}: ours/HF tokens/s {speed:.2f}x (best steps {best:.2f}x; "
                f"goal >= {SPEED_GOAL}x), peak memory {memory:.2f}x (goal <= {MEMORY_GOAL}x): goal {met}"
            )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--workdir", default=None, help="where data, model and runs are kept (default: a temp dir)"
    )
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per run (default: 12)")
    p.add_argument("--warmup", type=int, default=3, help="first steps left out of the median (default: 3)")
    p.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    p.add_argument("--procs", nargs="+", type=int, choices=[1, 2], default=[1, 2])
    p.add_argument(
        "--engines",
        nargs="+",
        choices=["deepspeed", "fsdp2", BF16_REDUCE],
        default=["deepspeed", "fsdp2", BF16_REDUCE],
        help=f"our sharding engines to measure, each against the same HF Trainer run ({BF16_REDUCE}: "
        "DeepSpeed with gradients reduced in bf16, run for multi-process bf16 only)",
    )
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=4, help="global batch (samples per optimizer step)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--expert-intermediate", type=int, default=512)
    p.add_argument("--timeout", type=float, default=900, help="seconds allowed to each run")
    args = p.parse_args(argv)
    if args.warmup >= args.steps:
        p.error(f"--warmup {args.warmup} must be smaller than --steps {args.steps}")
    if any(args.batch % n for n in args.procs):
        p.error(f"--batch {args.batch} must divide evenly over --procs {args.procs}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="train_throughput_")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    setup = Setup(
        workdir=workdir,
        model_dir=prepare_model(workdir, args),
        data_path=prepare_data(workdir),
        cache_dir=str(workdir / "cache"),
        seq=args.seq,
        batch=args.batch,
        steps=args.steps,
        warmup=args.warmup,
        timeout=args.timeout,
    )
    build_index(setup)
    load_at_start = os.getloadavg()[0]
    results: list[Result] = []
    configurations = [(p, precision) for p in args.procs for precision in args.precisions]
    for i, (processes, precision) in enumerate(configurations):
        print(f"== {processes} process(es), {precision}", flush=True)
        # Alternate who goes first, so a drift in the machine's load does not always favour one side.
        engines = [e for e in args.engines if e != BF16_REDUCE or (processes > 1 and precision == "bf16")]
        contenders = [*engines, "HF Trainer"]
        for contender in contenders[:: 1 if i % 2 == 0 else -1]:
            if contender != "HF Trainer":
                result = run_ours(setup, processes, precision, contender)
            elif processes > 1:
                result = run_hf_multi(setup, processes, precision)
            else:
                result = run_hf(setup, processes, precision, deepspeed=False)
            print(
                f"  {result.contender}: {result.tokens_per_s:.0f} tokens/s, peak {result.peak_gb:.2f} GB/rank, "
                f"step times {[round(t, 2) for t in result.step_times]}",
                flush=True,
            )
            results.append(result)
    results.sort(
        key=lambda r: (
            configurations.index((r.processes, r.precision)),
            r.contender == "HF Trainer",
            r.contender,
        )
    )
    records = [
        {**asdict(r), "tokens_per_s": r.tokens_per_s, "best_tokens_per_s": r.best_tokens_per_s}
        for r in results
    ]
    (workdir / "results.json").write_text(json.dumps(records, indent=1))
    print(
        f"\nQwen2-MoE hidden {args.hidden}, {args.layers} layers, {args.experts} experts top-{args.top_k} + 1 "
        f"shared, vocab 129k; seq {args.seq}, global batch {args.batch}, {args.steps} steps "
        f"(median of the last {args.steps - args.warmup}); work dir {workdir}\n"
    )
    print(format_table(results))
    # Other jobs on the machine show up as noisy step times; the load average says whether there were any.
    print(f"load average (1 min) at start {load_at_start:.2f}, at end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
