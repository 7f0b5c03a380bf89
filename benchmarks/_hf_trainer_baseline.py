"""Baseline of `train_throughput.py`: Hugging Face `transformers.Trainer` on the same model and samples.

Started by the benchmark as its own process (plain `python -m _hf_trainer_baseline` for one process,
`torchrun` for several), it trains the model folder for `--steps` optimizer steps and writes one JSON per
rank (`OUT_rank<N>.json`) with the time of every step (from `on_step_begin` to `on_step_end`, i.e.
forward, backward, clipping and optimizer step, without data loading and logging), the logged losses and
the process's peak memory: its peak resident set size, and what `metrics.peak_memory_gb` (the function
our trainer reports with) gives, i.e. `torch.cuda.max_memory_allocated()` when it trains on a GPU.

It trains on the GPU when CUDA is available (one device per process, as accelerate assigns them), else
on the CPU. `--attn-implementation` and `--gradient-checkpointing` (HF's recomputation of decoder layers,
non-reentrant as our `train.activation_checkpointing` is) set what the GPU check compares.

What it trains on is exactly what `moe-recipes train` trains on: the windows of `seq + 1` tokens that
`build_pretrain_datasets` gives for the same data path, split, seed and cache folder, in the same order
(`train_sampling_strategy="sequential"`; with several processes rank r takes the r-th micro-batch of
each global batch, as our sampler does). A sample is `input_ids = tokens[:-1]` with `shift_labels =
tokens[1:]` (the form padding-free collators use, so that HF's loss has the same `seq` targets as ours);
`labels` is `input_ids`, which HF needs to compute a loss at all. `output_router_logits=True` so that HF
also computes the load-balancing loss.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

from moe_recipes.data.pretrain import build_pretrain_datasets
from moe_recipes.train.metrics import peak_memory_gb


class WindowDataset(Dataset):
    """Pre-training windows as the tensors HF's causal-LM loss wants (see the module doc)."""

    def __init__(self, samples: Any):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        tokens = torch.from_numpy(self.samples[i]["tokens"])  # (seq + 1,)
        inputs = tokens[:-1].contiguous()
        return {"input_ids": inputs, "labels": inputs, "shift_labels": tokens[1:].contiguous()}


class StepTimer(TrainerCallback):
    """Records the wall time of every optimizer step and every logged loss."""

    def __init__(self) -> None:
        self.step_times: list[float] = []
        self.losses: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._start = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.step_times.append(time.perf_counter() - self._start)

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any
    ) -> None:
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="Hugging Face model folder")
    p.add_argument("--data-path", required=True, help="indexed dataset prefix")
    p.add_argument("--split", required=True)
    p.add_argument("--cache-dir", required=True, help="sample-index cache (the one our trainer uses)")
    p.add_argument("--seq", type=int, required=True)
    p.add_argument("--micro-batch", type=int, required=True)
    p.add_argument("--global-batch", type=int, required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--precision", choices=["fp32", "bf16"], required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--weight-decay", type=float, required=True)
    p.add_argument("--betas", type=float, nargs=2, required=True)
    p.add_argument("--eps", type=float, required=True)
    p.add_argument("--grad-clip", type=float, required=True)
    p.add_argument("--attn-implementation", default="sdpa", help="sdpa (default) or flash_attention_2")
    p.add_argument(
        "--gradient-checkpointing", action="store_true", help="recompute decoder layers in backward"
    )
    p.add_argument("--deepspeed", default=None, help="DeepSpeed JSON (ZeRO) for the multi-process run")
    p.add_argument("--output-dir", required=True, help="Trainer output_dir (nothing is saved there)")
    p.add_argument("--out", required=True, help="result prefix: writes OUT_rank<N>.json")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def training_arguments(args: argparse.Namespace, world_size: int) -> TrainingArguments:
    """The same optimizer, batch, precision and clipping as our run; no eval, no checkpoint, no reports."""
    per_step = args.micro_batch * world_size
    if args.global_batch % per_step:
        raise ValueError(
            f"--global-batch {args.global_batch} is not a multiple of --micro-batch "
            f"{args.micro_batch} x {world_size} processes"
        )
    return TrainingArguments(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=args.global_batch // per_step,
        max_steps=args.steps,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        adam_beta1=args.betas[0],
        adam_beta2=args.betas[1],
        adam_epsilon=args.eps,
        max_grad_norm=args.grad_clip,
        lr_scheduler_type="constant",
        warmup_steps=0,
        bf16=args.precision == "bf16",
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        dataloader_num_workers=0,
        train_sampling_strategy="sequential",
        remove_unused_columns=False,
        seed=args.seed,
        use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=args.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if args.gradient_checkpointing else None,
        ddp_backend="gloo" if world_size > 1 and not torch.cuda.is_available() else None,
        deepspeed=args.deepspeed,
        disable_tqdm=True,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    train_ds, _, _ = build_pretrain_datasets(
        args.data_path,
        args.split,
        args.seq,
        (args.steps * args.global_batch, 0, 0),
        seed=args.seed,
        cache_dir=args.cache_dir,
    )
    if train_ds is None:
        raise ValueError(f"split {args.split!r} leaves no training documents in {args.data_path}")
    training_args = training_arguments(args, world_size)
    model = AutoModelForCausalLM.from_pretrained(
        args.model,
        dtype=torch.float32,
        attn_implementation=args.attn_implementation,
        experts_implementation="grouped_mm",
    )
    model.config.output_router_logits = True
    model.config.use_cache = False
    timer = StepTimer()
    trainer = Trainer(
        model=model, args=training_args, train_dataset=WindowDataset(train_ds), callbacks=[timer]
    )
    processes = trainer.accelerator.num_processes
    trainer.train()
    record = {
        "rank": rank,
        "world_size": world_size,
        "accelerate_processes": processes,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "threads": torch.get_num_threads(),
        "optimizer": f"{getattr(training_args.optim, 'value', training_args.optim)} ({type(trainer.optimizer.optimizer).__name__})",
        "step_times": timer.step_times,
        "losses": timer.losses,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # KiB on Linux
        "peak_memory_gb": peak_memory_gb(),
        "device": str(trainer.args.device),
    }
    Path(f"{args.out}_rank{rank}.json").write_text(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
