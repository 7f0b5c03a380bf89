"""The training loop: set-up, one readable train step, evaluation, logging and checkpoints.

`train(cfg)` runs a whole job on any number of processes (torchrun, deepspeed, mpirun, srun) and returns
the process exit code: 0 when done or stopped cleanly by SIGTERM/SIGINT, 3 on a non-finite loss with
`train.nan_policy=stop`.
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from moe_recipes.config import Config
from moe_recipes.data.factory import build_training_data
from moe_recipes.data.sampler import PretrainBatchSampler
from moe_recipes.distributed.env import DistEnv, barrier, destroy_distributed, device_for, init_distributed
from moe_recipes.distributed.startup import bounded_extension_builds
from moe_recipes.engines.deepspeed_ep import initialize_expert_parallel
from moe_recipes.engines.deepspeed_zero import (
    deepspeed_config,
    gradient_accumulation_steps,
    initialize,
    partition_and_fill,
    set_lr,
)
from moe_recipes.engines.fsdp2 import initialize_fsdp
from moe_recipes.engines.grad_norm import squared_sum
from moe_recipes.faults import fault_point
from moe_recipes.fileio import InUseError, RunLock
from moe_recipes.models.balancing import check_bias_update, measure_global_load, update_routing_bias
from moe_recipes.models.freeze import freeze_parameters
from moe_recipes.models.inspect import MoEInfo, flops_per_token, inspect_model
from moe_recipes.models.loading import load_model
from moe_recipes.models.sharded_load import build_on_meta
from moe_recipes.precision import resolve_precision
from moe_recipes.train import checkpoint as ckpt_io
from moe_recipes.train.metrics import (
    MetricsWriter,
    console_line,
    device_peak_tflops,
    expert_load_summary,
    peak_memory_gb,
    peak_rss_bytes,
    per_rank_text,
    process_age_seconds,
)
from moe_recipes.train.objective import IGNORE_INDEX, CausalLMObjective, loss_chunk_tokens
from moe_recipes.train.plan_report import warn_if_over_memory
from moe_recipes.train.plan_startup import (
    EXPERTS,
    PARTITIONED,
    RANK0_READS,
    RANK0_SCATTER,
    SHARDED,
    training_start,
)
from moe_recipes.train.preflight import preflight
from moe_recipes.train.preflight import report as report_preflight
from moe_recipes.train.schedule import lr_at
from moe_recipes.train.signals import StopRequest

EXIT_NONFINITE = 3


@dataclass
class Run:
    """Everything the loop needs, built once by `setup`."""

    cfg: Config
    env: DistEnv
    device: torch.device
    engine: Any
    optimizer: Any
    info: MoEInfo
    grad_accum: int
    flops_per_token: float
    collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]
    train_ds: Any
    valid_ds: Any
    writer: MetricsWriter
    iteration: int = 0
    consumed_samples: int = 0
    keep_alive: list[Any] = field(default_factory=list)
    startup_seconds: float = 0.0  # set-up of the process group, model, engine and data (the start-up line)
    steps_run: int = 0  # steps this process has run (0 until its first step: the first-step line)

    @property
    def is_main(self) -> bool:
        return self.env.rank == 0

    def print(self, *args: Any) -> None:
        if self.is_main:
            print(*args, flush=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup(cfg: Config) -> Run:
    """Process group, model, engine and data; every wait in here is bounded (see distributed.startup)."""
    with bounded_extension_builds(cfg.distributed.init_timeout_minutes * 60):
        return _setup(cfg)


def _setup(cfg: Config) -> Run:
    started = time.perf_counter()
    checks = preflight(cfg)  # paths, data, vocabulary, resume: before anything that takes time
    d = cfg.distributed
    use_ds = d.engine == "deepspeed"
    env = init_distributed(
        backend=d.backend,
        timeout_minutes=d.timeout_minutes,
        use_deepspeed=use_ds,
        init_timeout_minutes=d.init_timeout_minutes,
    )
    device = device_for(env)
    precision = _resolve_precision(cfg, device)
    report_preflight(checks, env.rank == 0)
    keep_alive: list[Any] = [_lock_save_dir(cfg, env, device)]
    # Before HfDeepSpeedConfig exists: under it, building even a meta model runs ZeRO-3's collectives
    if env.rank == 0 and (note := warn_if_over_memory(cfg, cfg.model.path, env.world_size, device)):
        print(note, file=sys.stderr, flush=True)
    seed_everything(cfg.train.seed)
    grad_accum = gradient_accumulation_steps(cfg, env.world_size)
    ds_config = deepspeed_config(cfg, env.world_size) if use_ds else {}
    load = training_start(cfg, ds_config)  # on meta, each rank reading only its part, where that applies
    if load is RANK0_READS:
        # Lets from_pretrained partition the weights while loading instead of materialising them on every rank.
        from transformers.integrations import HfDeepSpeedConfig

        keep_alive.append(HfDeepSpeedConfig(ds_config))
    if load in (SHARDED, RANK0_SCATTER, PARTITIONED, EXPERTS):  # ZeRO-3 fills here, the rest after a cut
        model = build_on_meta(
            cfg.model.path,
            attn_implementation=cfg.model.attn_implementation,
            experts_implementation=cfg.model.experts_implementation,
        )
        if load is PARTITIONED:
            partition_and_fill(model, ds_config, cfg.model.path)
    else:
        model = load_model(
            cfg.model.path,
            attn_implementation=cfg.model.attn_implementation,
            experts_implementation=cfg.model.experts_implementation,
            device=device,
        )
    model.config.use_cache = False
    if cfg.train.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    info = inspect_model(model)
    check_bias_update(info, cfg.moe.bias_update_rate)
    params = freeze_parameters(model, info, cfg.moe.freeze, cfg.moe.freeze_patterns)
    aux_coef = cfg.moe.aux_loss_coef
    if aux_coef is None:
        aux_coef = getattr(model.config, "router_aux_loss_coef", None)
        aux_coef = 0.01 if aux_coef is None else float(aux_coef)  # a checkpoint's 0 stays 0
    objective = CausalLMObjective(
        model,
        info,
        aux_coef=aux_coef,
        z_coef=cfg.moe.z_loss_coef,
        chunk_size=loss_chunk_tokens(cfg.train.loss_chunk_size, model.config.get_text_config().vocab_size),
        bf16=cfg.train.precision == "bf16",
        fused_head=use_ds and cfg.distributed.zero_stage != 3,  # sharded heads: chunked path
        global_coef=cfg.moe.global_aux_loss_coef,
        seq_coef=cfg.moe.seq_aux_loss_coef,
        loss_kernel=cfg.train.loss_kernel,
        aux_loss_type=cfg.moe.aux_loss_type,
    )
    fpt = flops_per_token(model, cfg.data.seq_length)
    weights = cfg.model.path if load in (SHARDED, RANK0_SCATTER, EXPERTS) else None  # filled after the cut
    if use_ds and d.expert_parallel_size > 1:
        engine, optimizer = initialize_expert_parallel(objective, cfg, ds_config, info, weights, device)
    elif use_ds:
        engine, optimizer = initialize(
            objective, cfg, ds_config, info.moe_block_classes, model.get_input_embeddings()
        )
    else:
        engine, optimizer = initialize_fsdp(objective, cfg, info, grad_accum, device, weights)
    data = build_training_data(cfg)
    writer = MetricsWriter(
        cfg.log.dir, env.rank == 0, cfg.log.tensorboard, cfg.log.wandb_project, cfg.to_dict()
    )
    run = Run(
        cfg=cfg,
        env=env,
        device=device,
        engine=engine,
        optimizer=optimizer,
        info=info,
        grad_accum=grad_accum,
        flops_per_token=fpt,
        collate=data.collate,
        train_ds=data.train,
        valid_ds=data.valid,
        writer=writer,
        keep_alive=keep_alive,
        startup_seconds=time.perf_counter() - started,
    )
    host_peaks = _per_rank(peak_rss_bytes() / 2**30, device)  # a collective: every rank, before the prints
    if run.is_main:
        cfg.save(writer.dir / "config.yaml")
        comm = getattr(engine, "communication_data_type", None)  # what DeepSpeed will actually reduce in
        reduce = str(comm).removeprefix("torch.") if comm is not None else cfg.distributed.reduce_dtype
        run.print(
            f"[moe-recipes] {env.world_size} process(es) ({env.launcher}), "
            f"{f'ZeRO-{cfg.distributed.zero_stage}' if use_ds else 'FSDP2'}, "
            f"{f'expert parallel {d.expert_parallel_size}, ' if d.expert_parallel_size > 1 else ''}"
            f"micro batch {cfg.train.micro_batch_size} x accumulation {grad_accum} x {env.world_size} ranks "
            f"= global batch {cfg.train.global_batch_size}; {info.num_experts} experts top-{info.top_k}, "
            f"aux coef {aux_coef}, z coef {cfg.moe.z_loss_coef}; "
            f"trainable parameters {params.trainable:,} of {params.total:,}; "
            f"precision {precision}, gradients reduced in {reduce}"
        )
        loaded = (
            load.said
            if load.said
            else "whole model loaded on every rank, then "
            + ("partitioned" if use_ds and d.zero_stage == 3 else "replicated" if use_ds else "sharded")
        )
        run.print(
            f"[moe-recipes] start-up {run.startup_seconds:.1f} s, {process_age_seconds():.1f} s after "
            f"process start ({loaded}); peak host memory per rank: {per_rank_text(host_peaks)}"
        )
    _maybe_resume(run, checks.resume_from)
    return run


def _lock_save_dir(cfg: Config, env: DistEnv, device: torch.device) -> RunLock | None:
    """Rank 0 locks checkpoint.save; every rank learns whether it could, so a refused run stops on all
    ranks at once instead of leaving the others waiting in their first collective."""
    lock, error = None, None
    if env.rank == 0 and cfg.checkpoint.save:
        try:
            lock = _claim_save_dir(Path(cfg.checkpoint.save))
        except InUseError as err:
            error = err
    refused = _sum_over_ranks(torch.tensor([float(error is not None)], device=device)).item()
    if error is not None:
        raise error
    if refused:
        raise RuntimeError(
            f"rank 0 could not lock checkpoint.save {cfg.checkpoint.save} (its error says why)"
        )
    return lock


def _claim_save_dir(save_dir: Path) -> RunLock:
    """Lock checkpoint.save for this run (a second run saving there is refused, naming the holder) and
    remove what an interrupted earlier run left in it."""
    lock = RunLock(save_dir / ".lock", f"checkpoint.save {save_dir}")
    for name in ckpt_io.clean_leftovers(save_dir):
        print(
            f"[moe-recipes] removed {save_dir / name}, left by an interrupted save (never a complete checkpoint)",
            file=sys.stderr,
            flush=True,
        )
    return lock


def _resolve_precision(cfg: Config, device: torch.device) -> str:
    """Resolve train.precision for this device (in cfg, so every component sees bf16 or fp32);
    returns the description for the start-up line."""
    requested = cfg.train.precision
    choice = resolve_precision(requested, device)
    if cfg.distributed.reduce_dtype == "bf16" and not choice.bf16:
        raise ValueError(
            f"distributed.reduce_dtype=bf16 needs bf16 compute, but train.precision={requested} "
            f"resolved to fp32 here ({choice.reason})"
        )
    cfg.train.precision = choice.name
    return choice.describe(requested)


def _maybe_resume(run: Run, ckpt: Path | None) -> None:
    if ckpt is None:
        return
    state = ckpt_io.load_checkpoint(run.engine, ckpt, seed=run.cfg.train.seed)
    run.iteration = int(state["iteration"])
    run.consumed_samples = int(state["consumed_samples"])
    note = f"; {state['resume_note']}" if "resume_note" in state else ""
    run.print(
        f"[moe-recipes] resumed from {ckpt} at step {run.iteration} ({run.consumed_samples} samples consumed)"
        + note
    )


def _train_batches(run: Run) -> Iterator[dict[str, torch.Tensor]]:
    t = run.cfg.train
    sampler = PretrainBatchSampler(
        total_samples=t.iters * t.global_batch_size,
        consumed_samples=run.consumed_samples,
        micro_batch_size=t.micro_batch_size,
        dp_rank=run.env.rank,
        dp_size=run.env.world_size,
    )
    workers = run.cfg.data.num_workers
    loader = DataLoader(
        run.train_ds,
        batch_sampler=sampler,
        collate_fn=run.collate,
        num_workers=workers,
        pin_memory=run.device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
    )
    for batch in loader:
        yield {k: v.to(run.device, non_blocking=True) for k, v in batch.items()}


def _per_rank(value: float, device: torch.device) -> list[float]:
    """Every rank's `value`, in rank order, on every rank (one all-reduce of a world-size vector)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [value]
    values = torch.zeros(dist.get_world_size(), dtype=torch.float64, device=device)
    values[dist.get_rank()] = value
    dist.all_reduce(values)
    return values.tolist()


def _report_first_step(run: Run, step_seconds: float) -> None:
    """After this process's first optimizer step: when it ended (from process start) and every rank's peak
    device and host memory so far, which the start-up line cannot know yet. A collective: every rank."""
    since_start = process_age_seconds()
    host = _per_rank(peak_rss_bytes() / 2**30, run.device)
    if run.device.type == "cuda":
        allocated = torch.cuda.max_memory_allocated(run.device) / 2**30
        device_text = f"(torch.cuda.max_memory_allocated) {per_rank_text(_per_rank(allocated, run.device))}"
    else:
        device_text = (
            f"none, a {run.device.type} run (parameters, optimizer states and activations are in host "
            "memory, counted in the host peak)"
        )
    run.print(
        f"[moe-recipes] first step of this process (step {run.iteration}) done {since_start:.1f} s after "
        f"process start (start-up {run.startup_seconds:.1f} s, the step {step_seconds:.1f} s); peak device "
        f"memory per rank: {device_text}; peak host memory per rank: {per_rank_text(host)}"
    )


def _all_reduce(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = t.to(device)
        dist.all_reduce(t)
    return t.cpu()


def _sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """All-reduce in place on the tensor's device; no host sync (NCCL runs it on the stream)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def _token_counts(micro_batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """(2,) float64 on the batches' device, summed over micro-batches (not yet over ranks): tokens with a
    label, and real input tokens (padding left out; packed batches say which through `real_tokens`)."""
    labelled = sum((mb["labels"] != IGNORE_INDEX).sum() for mb in micro_batches)
    real = sum(_real_token_count(mb) for mb in micro_batches)
    return torch.stack([torch.as_tensor(labelled), torch.as_tensor(real)]).double()


def _real_token_count(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    mask = batch.get("real_tokens")
    if mask is None and batch.get("attention_mask") is not None and batch["attention_mask"].dim() == 2:
        mask = batch["attention_mask"]
    if mask is None:
        return torch.tensor(batch["input_ids"].numel(), device=batch["input_ids"].device)
    return (mask != 0).sum()


# Loss parts summed over micro-batches and ranks, in this order (one tensor, one all-reduce)
_PARTS = ("lm_loss_sum", "aux_loss", "z_loss", "nonfinite", "stop", "global_aux_loss", "seq_aux_loss")


def train_step(run: Run, micro_batches: list[dict[str, torch.Tensor]], stop: StopRequest) -> dict[str, Any]:
    """Forward, loss parts and backward for every micro-batch, then one optimizer step.

    Loss parts stay on the device until one all-reduce after the last backward; its copy to the host is
    the step's one synchronisation, and it comes before the optimizer step, so the non-finite check is
    exact (a non-finite loss on any rank or micro-batch stops or skips the whole step everywhere).
    """
    engine = run.engine
    n = run.grad_accum * run.env.world_size
    tokens = _sum_over_ranks(_token_counts(micro_batches))  # (labelled, real) over the global batch
    # DeepSpeed divides each micro-batch loss by the accumulation steps and averages gradients over
    # ranks; this factor turns that into a sum over every token of the global batch / its token count.
    lm_scale = (n / tokens[0].clamp_min(1.0)).float()
    if engine.module.coefs.global_batch:  # route the step's micro-batches first: exact global expert load
        engine.module.global_load = measure_global_load(
            lambda b: engine(**b, route_only=True)["expert_counts"],
            micro_batches,
            run.info.top_k,
            n,
            lambda t: _all_reduce(t, run.device),
        )
    sums: torch.Tensor | None = None
    counts: torch.Tensor | None = None
    for micro, batch in enumerate(micro_batches):
        if micro > 0:
            engine.step()  # DeepSpeed counts micro-steps here; it updates only at the accumulation boundary
        out = engine(**batch)
        loss = out["lm_loss_sum"] * lm_scale + out["moe_loss"]
        engine.backward(loss)
        out["nonfinite"] = (~torch.isfinite(loss.detach())).float()
        out["stop"] = torch.zeros((), device=loss.device)
        parts = torch.stack([out[k].detach().double().reshape(()) for k in _PARTS])
        sums = parts if sums is None else sums + parts
        step_counts = out["expert_counts"].double()
        counts = step_counts if counts is None else counts + step_counts
    assert sums is not None and counts is not None  # grad_accum >= 1
    sums[_PARTS.index("stop")] = 1.0 if stop.requested else 0.0
    fault_point("before_reduce", run.iteration + 1)
    flat = _sum_over_ranks(torch.cat([sums, counts.to(sums.device).reshape(-1)]))
    host = torch.cat([flat, tokens.to(flat.device)]).tolist()  # the step's one host sync
    totals = dict(zip(_PARTS, host[: len(_PARTS)], strict=True))
    counts = torch.tensor(host[len(_PARTS) : -2], dtype=torch.float64).reshape(counts.shape)
    global_tokens, real_tokens = max(host[-2], 1.0), host[-1]
    nonfinite = totals["nonfinite"] > 0
    lr = lr_at(run.iteration, run.cfg.optim, run.cfg.train.iters)
    set_lr(engine, lr)
    if nonfinite and run.cfg.train.nan_policy == "skip":
        run.optimizer.skip_next_step = True
    # ZeRO optimizers report the (pre-clipping) global norm; at stage 0 the full gradients are local
    stage0 = run.cfg.distributed.engine == "deepspeed" and run.cfg.distributed.zero_stage == 0
    local_norm = _grad_norm(engine) if stage0 else None
    if not nonfinite or run.cfg.train.nan_policy == "skip":
        engine.step()
    if run.cfg.moe.bias_update_rate and not nonfinite:  # every rank: same all-reduced counts, same update
        update_routing_bias(run.info, counts, run.cfg.moe.bias_update_rate)
    return {
        "lm_loss": totals["lm_loss_sum"] / global_tokens,
        "aux_loss": totals["aux_loss"] / n,
        "z_loss": totals["z_loss"] / n,
        "global_aux_loss": totals["global_aux_loss"],
        "seq_aux_loss": totals["seq_aux_loss"] / n,
        "nonfinite": nonfinite,
        "stop": totals["stop"] > 0,
        "lr": lr,
        "expert_counts": counts,
        # a tensor (or DeepSpeed's number): read only when the step is logged
        "grad_norm": local_norm if local_norm is not None else engine.get_global_grad_norm(),
        "tokens": global_tokens,
        "real_tokens": real_tokens,
    }


def _grad_norm(engine: Any) -> torch.Tensor | float:
    """ZeRO-0's global gradient norm (every rank holds the full, reduced gradients), summed in fp64 like
    the other engines' (`engines.grad_norm`)."""
    if hasattr(engine, "global_grad_norm"):  # expert parallel: ranks hold different experts' gradients
        return engine.global_grad_norm()
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    return squared_sum(grads).sqrt().float()


def evaluate(run: Run) -> float | None:
    """Mean token loss over the first eval.iters x global_batch_size samples of the validation split.

    The samples do not depend on the number of processes: each rank takes its micro-batches of every
    global batch, as in training.
    """
    if run.valid_ds is None or run.cfg.eval.iters <= 0:
        return None
    t, env = run.cfg.train, run.env
    run.engine.eval()
    totals = torch.zeros(2, dtype=torch.float64)
    sampler = PretrainBatchSampler(
        total_samples=run.cfg.eval.iters * t.global_batch_size,
        consumed_samples=0,
        micro_batch_size=t.micro_batch_size,
        dp_rank=env.rank,
        dp_size=env.world_size,
    )
    with torch.no_grad():
        for indices in sampler:
            batch = run.collate([run.valid_ds[i] for i in indices])
            out = run.engine(**{k: v.to(run.device) for k, v in batch.items()})
            totals += torch.tensor([out["lm_loss_sum"].item(), out["tokens"].item()], dtype=torch.float64)
    run.engine.train()
    totals = _all_reduce(totals, run.device)
    return totals[0].item() / max(totals[1].item(), 1.0)


def _record(run: Run, result: dict[str, Any], seconds: float) -> dict[str, Any]:
    cfg = run.cfg
    tokens = result["real_tokens"]  # input tokens that are not padding (what the model really computes on)
    tflops = run.flops_per_token * tokens / seconds / run.env.world_size / 1e12
    peak = cfg.log.peak_tflops or device_peak_tflops()
    use_aux = bool(run.info.routers)
    loss = result["lm_loss"]
    if use_aux:
        loss += run.engine.module.coefs.total(result)
    record: dict[str, Any] = {
        "step": run.iteration,
        "loss": loss,
        "lm_loss": result["lm_loss"],
        "aux_loss": result["aux_loss"] if use_aux else None,
        "z_loss": result["z_loss"] if use_aux else None,
        "global_aux_loss": result["global_aux_loss"] if run.engine.module.coefs.global_batch else None,
        "seq_aux_loss": result["seq_aux_loss"] if run.engine.module.coefs.sequence else None,
        "lr": result["lr"],
        "grad_norm": None if result["grad_norm"] is None else float(result["grad_norm"]),
        "tokens_per_s": tokens / seconds,
        "real_tokens": result["real_tokens"],
        "labelled_tokens": result["tokens"],
        "tflops_per_device": tflops,
        "mfu": tflops / peak if peak else None,
        "step_time": seconds,
        "consumed_samples": run.consumed_samples,
        "skipped": result["nonfinite"],
        "peak_mem_gb": peak_memory_gb(),
    }
    if result["expert_counts"].numel():
        record["expert_share"], record["expert_imbalance"] = expert_load_summary(result["expert_counts"])
    return record


def _save(run: Run) -> None:
    if not run.cfg.checkpoint.save:
        return
    state = {
        "iteration": run.iteration,
        "consumed_samples": run.consumed_samples,
        "world_size": run.env.world_size,
        "engine": run.cfg.distributed.engine,
        "zero_stage": run.cfg.distributed.zero_stage if run.cfg.distributed.engine == "deepspeed" else None,
        "expert_parallel_size": run.cfg.distributed.expert_parallel_size,
        "global_batch_size": run.cfg.train.global_batch_size,
        "seq_length": run.cfg.data.seq_length,
        "base_model": os.path.abspath(run.cfg.model.path),
        "model_type": run.engine.module.model.config.model_type,
    }
    path = ckpt_io.save_checkpoint(run.engine, run.cfg, run.iteration, state)
    run.print(f"[moe-recipes] saved checkpoint {path}")


def _progress(run: Run):
    if not (run.is_main and run.cfg.log.progress_bar and sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=run.cfg.train.iters, initial=run.iteration, unit="step", dynamic_ncols=True)


def train(cfg: Config) -> int:
    run = setup(cfg)
    stop = StopRequest().install()
    try:
        rc = _loop(run, stop)
    finally:
        stop.restore()
        run.writer.close()
        for held in run.keep_alive:
            if isinstance(held, RunLock):
                held.release()
    # Every rank ends the loop at the same step. Tear the group down in order: a gloo group still alive
    # when the interpreter exits can abort the process ("terminate called without an active exception")
    # after all the work is done, failing the job.
    barrier()
    destroy_distributed()
    return rc


def _loop(run: Run, stop: StopRequest) -> int:
    cfg = run.cfg
    batches = _train_batches(run)
    bar = _progress(run)
    last_saved = run.iteration if run.iteration > 0 else -1  # resumed: that checkpoint exists
    exit_at = run.iteration + cfg.train.exit_interval if cfg.train.exit_interval else None
    while run.iteration < cfg.train.iters:
        start = time.perf_counter()
        micro_batches = [next(batches) for _ in range(run.grad_accum)]
        fault_point("step_start", run.iteration + 1)
        result = train_step(run, micro_batches, stop)
        if result["nonfinite"] and cfg.train.nan_policy == "stop":
            run.print(
                f"[moe-recipes] non-finite loss (lm {result['lm_loss']}) at step {run.iteration + 1}: "
                f"stopping without saving (train.nan_policy=stop)"
            )
            return EXIT_NONFINITE
        run.iteration += 1
        run.consumed_samples += cfg.train.global_batch_size
        run.steps_run += 1
        step_seconds = time.perf_counter() - start
        if result["nonfinite"]:
            run.print(f"[moe-recipes] non-finite loss at step {run.iteration}: update skipped")
        if run.iteration % cfg.log.interval == 0 or run.iteration == cfg.train.iters:
            record = _record(run, result, time.perf_counter() - start)
            run.writer.log(record)
            line = console_line(record, cfg.train.iters)
            if bar:
                bar.write(line)
            else:
                run.print(line)
        if bar:
            bar.update(1)
        if run.steps_run == 1:  # after the step's own logging, so its timing does not include this report
            _report_first_step(run, step_seconds)
        done = run.iteration == cfg.train.iters
        if (cfg.eval.interval and run.iteration % cfg.eval.interval == 0) or done:
            _log_eval(run)
        if result["stop"] or run.iteration == exit_at:
            if last_saved != run.iteration:
                _save(run)
            why = "by signal" if result["stop"] else "at train.exit_interval"
            run.print(f"[moe-recipes] stopped {why} after step {run.iteration}; resume with --resume")
            return 0
        if cfg.checkpoint.save_interval and run.iteration % cfg.checkpoint.save_interval == 0:
            _save(run)
            last_saved = run.iteration
    if bar:
        bar.close()
    if last_saved != run.iteration:
        _save(run)
    return 0


def _log_eval(run: Run) -> None:
    loss = evaluate(run)
    if loss is None:
        return
    ppl = math.exp(min(loss, 50.0))
    run.writer.log({"step": run.iteration, "valid_loss": loss, "valid_ppl": ppl})
    run.print(f"[moe-recipes] step {run.iteration}: valid loss {loss:.4f}, perplexity {ppl:.2f}")
