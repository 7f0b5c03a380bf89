"""train.precision=bf16 puts every matrix multiply of forward and backward in bf16 on every engine (ZeRO 0-3,
FSDP2, both expert-parallel paths), and fp32 puts none there; the optimizer runs on fp32 master weights.

A `TorchDispatchMode` sees the ops below autocast, i.e. with the dtypes the kernels get. The autograd
engine runs the CPU backward in the calling thread, so the mode sees the backward too. One 2-process job
trains one step of every engine in both precisions, at the smallest size: bf16 is emulated, 40-60x slower
than fp32, on CPUs without AVX-512-BF16/AMX.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.harness import run_distributed

from .utils import make_config, step_records

pytestmark = pytest.mark.distributed

# What the matmuls of attention, routers, experts (grouped_mm or the eager loop), shared experts and the LM
# head reach the kernels as (linear and matmul decompose into these before the mode sees them)
MATMULS = ("mm", "addmm", "bmm", "baddbmm", "_grouped_mm", "_scaled_dot_product")
OPTIMIZER = "_fused_adamw"
ENGINES = {
    "zero0": ("distributed.zero_stage=0",),
    "zero1": ("distributed.zero_stage=1",),
    "zero2": ("distributed.zero_stage=2",),
    "zero3": ("distributed.zero_stage=3",),
    "fsdp2": ("distributed.engine=fsdp2",),
    "deepspeed_ep2": ("distributed.zero_stage=2", "distributed.expert_parallel_size=2"),
    # ZeRO-0 with EP reduces expert gradients and computes the global gradient norm its own way
    "deepspeed_ep2_zero0": ("distributed.zero_stage=0", "distributed.expert_parallel_size=2"),
    "fsdp2_ep2": ("distributed.engine=fsdp2", "distributed.expert_parallel_size=2"),
}
# One step of one micro-batch of 16 tokens per rank, no evaluation
SMALLEST = (
    "train.iters=1",
    "train.micro_batch_size=1",
    "train.global_batch_size=2",
    "data.seq_length=16",
    "eval.iters=0",
)


class OpDtypes(TorchDispatchMode):
    """Counts (op, dtypes of its floating tensor arguments) of the matmul and optimizer ops."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: Counter[tuple[str, tuple[str, ...]]] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name.startswith(MATMULS):  # the operands (attention: query, key, value / grad, query, key)
            tensors = [a for a in args[:3] if isinstance(a, torch.Tensor)]
        elif name.startswith(OPTIMIZER):  # parameters, gradients, moments
            tensors = [
                t for a in args if isinstance(a, (list, tuple)) for t in a if isinstance(t, torch.Tensor)
            ]
        else:
            return func(*args, **(kwargs or {}))
        dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors if t.is_floating_point()})
        self.seen[(name, tuple(dtypes))] += 1
        return func(*args, **(kwargs or {}))


def _probe_engines(workdir: str, model: str, data: str) -> dict[str, dict[tuple[str, tuple[str, ...]], int]]:
    """On each rank: train one step of every engine in both precisions under the probe, in one process group
    (torch cannot re-create a group on the same port in one process, so the trainer must not destroy it)."""
    from moe_recipes.distributed.env import _skip_deepspeed_shm_op
    from moe_recipes.precision import resolve_precision
    from moe_recipes.train import trainer

    trainer.destroy_distributed = lambda: None
    # The harness made the process group, so the trainer adopts it and skips the DeepSpeed set-up of
    # init_distributed, which keeps DeepSpeed from JIT-building its CPU shm op (a C++ build of about a minute
    # on two cores, on a machine without it in ~/.cache/torch_extensions): that step here, as under a launcher.
    _skip_deepspeed_shm_op()
    # Where bf16 is emulated, the first bf16 run warns with a measured fp32/bf16 matmul ratio: not training
    resolve_precision("bf16", torch.device("cpu"))
    out = {}
    for precision in ("bf16", "fp32"):
        for engine, extra in ENGINES.items():
            run = Path(workdir) / f"{engine}_{precision}"
            cfg = make_config(run, model, data, *SMALLEST, *extra, f"train.precision={precision}")
            probe = OpDtypes()
            with probe:
                assert trainer.train(cfg) == 0
            out[f"{engine} {precision}"] = dict(probe.seen)
            first = step_records(run / "run")[1]
            out[f"{engine} {precision} step 1"] = (first["lm_loss"], first["grad_norm"])
    return out


def test_every_matmul_runs_in_the_configured_precision_on_every_engine(tmp_path, ep_models, tiny_dataset):
    # Qwen2-MoE: attention, router, routed experts (grouped_mm) and a gated shared expert
    ranks = run_distributed(
        _probe_engines, 2, str(tmp_path), ep_models["qwen2_moe"], tiny_dataset, timeout=900
    )
    expected = sorted(f"{e} {p}" for e in ENGINES for p in ("bf16", "fp32"))
    wrong = []
    for rank, seen in enumerate(ranks):
        first = {run: seen.pop(run) for run in list(seen) if run.endswith("step 1")}
        assert sorted(seen) == expected
        # The engines agree on the first step's loss and gradient norm (the model and tokens are the same):
        # to fp32 rounding in fp32 (measured: 5e-8 and 0 apart); in bf16 to bf16 rounding (measured: loss 1.7e-6,
        # gradient norm 3.3e-4 apart, FSDP2's bf16 parameters against autocast over fp32 ones)
        for precision, loss_tol, norm_tol in (("fp32", 1e-6, 1e-6), ("bf16", 1e-5, 2e-3)):
            runs = {e: first[f"{e} {precision} step 1"] for e in ENGINES}
            ref = runs["zero0"]
            for engine, (loss, norm) in runs.items():
                assert loss == pytest.approx(ref[0], rel=loss_tol), (precision, engine, runs)
                assert norm == pytest.approx(ref[1], rel=norm_tol), (precision, engine, runs)
        for run, ops in seen.items():
            dtype = "bfloat16" if run.endswith("bf16") else "float32"
            names = {name for name, _ in ops}
            assert {"mm", "_grouped_mm"} <= names, (run, ops)
            assert any(n.startswith("_scaled_dot_product") for n in names), (run, ops)
            assert any(n.startswith(OPTIMIZER) for n in names), (run, ops)
            for (name, dtypes), count in ops.items():
                want = "float32" if name.startswith(OPTIMIZER) else dtype  # fp32 master weights and moments
                if dtypes != (want,):
                    wrong.append((rank, run, name, dtypes, count))
    assert not wrong, wrong
