"""Benchmark: peak memory per rank of FSDP2 gradient accumulation, against accumulation 1.

Two processes (gloo, CPU) shard one random Mixtral-shaped model (no tokenizer, no download; --hidden,
--layers, --experts set its size) with the trainer's own `initialize_fsdp` and train it with
`FSDPEngine.backward/step` as the trainer does, at micro batch 1 x --seq tokens, with gradient
accumulation 1 and 4, once with the default (reduce-scatter every micro-batch, sharded gradients
accumulate) and once with `distributed.fsdp_defer_grad_sync=true` (unsharded gradients kept until the
boundary). Every configuration runs in fresh processes.

Memory, per rank (the table shows the largest of the two ranks): "runtime" is the resident set before
the model is built (Python, torch, gloo); after one warm-up optimizer step (so the Adam states exist)
each rank resets its peak resident set (`/proc/self/clear_refs`, Linux; "base" = the resident set then:
runtime + sharded parameters + Adam states) and trains --steps more steps. "peak" is the peak resident
set (`VmHWM`) over those steps, "training" = peak - runtime (the memory training the model takes:
parameter and optimizer shards, gradients, activations, gathered layers) and "growth" = peak - base
(what a step adds on top of the sharded parameters and optimizer states). glibc is told to return freed
large blocks to the system (`MALLOC_MMAP_THRESHOLD_`), so the resident set follows the live tensors.
The ratios are accumulation 4 / accumulation 1 of the same setting; the goal is "training" <= 1.15x
for the default. The losses of both settings are compared as a check that they train the same way.

    PYTHONPATH=src .venv/bin/python benchmarks/fsdp_accum_memory.py [--hidden 512 --layers 8 ...]
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
from pathlib import Path

GOAL = 1.15  # peak growth with accumulation 4 / accumulation 1, at most (default setting)
MIB = 2**20


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _measure(defer: bool, accum: int, size: dict, seq: int, steps: int) -> dict:
    """One rank: shard the model, one warm-up step, then peak resident-set growth over `steps` steps."""
    import torch
    from transformers import AutoModelForCausalLM, MixtralConfig

    from moe_recipes.config import Config
    from moe_recipes.engines.fsdp2 import initialize_fsdp
    from moe_recipes.models.inspect import inspect_model
    from moe_recipes.train.objective import CausalLMObjective

    runtime = _rss_kib("VmRSS")
    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=size["vocab"],
        hidden_size=size["hidden"],
        intermediate_size=2 * size["hidden"],
        num_hidden_layers=size["layers"],
        num_attention_heads=8,
        num_key_value_heads=8,
        num_local_experts=size["experts"],
        num_experts_per_tok=2,
        max_position_embeddings=max(seq, 128),
    )
    model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    info = inspect_model(model)
    objective = CausalLMObjective(
        model, info, aux_coef=0.02, z_coef=0.0, chunk_size=1024, bf16=False, fused_head=False
    )
    cfg = Config()
    cfg.distributed.engine = "fsdp2"
    cfg.distributed.fsdp_defer_grad_sync = defer
    cfg.train.precision = "fp32"
    engine, _ = initialize_fsdp(objective, cfg, info, accum, torch.device("cpu"))
    del model, objective
    rank = torch.distributed.get_rank()
    gen = torch.Generator().manual_seed(1000 + rank)  # the same micro-batches in every configuration
    losses = []

    def step() -> None:
        for _ in range(accum):
            ids = torch.randint(0, size["vocab"], (1, seq), generator=gen)
            out = engine(input_ids=ids, labels=ids)
            loss = out["lm_loss_sum"] / out["tokens"] + out["moe_loss"]
            engine.backward(loss)
            engine.step()
            losses.append(float(loss.detach()))

    step()
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
    base = _rss_kib("VmRSS")
    for _ in range(steps):
        step()
    peak = _rss_kib("VmHWM")
    return {"params": params, "runtime_mib": runtime / 1024, "base_mib": base / 1024, "peak_mib": peak / 1024,
            "losses": losses}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2, help="measured optimizer steps after the warm-up one")
    args = parser.parse_args()
    # Inherited by the ranks: large blocks are mmap'ed and given back when freed, so RSS tracks live tensors.
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for tests.harness
    from tests.harness import run_distributed

    size = {"hidden": args.hidden, "layers": args.layers, "experts": args.experts, "vocab": args.vocab}
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; 2 processes (gloo)")
    results: dict[tuple[bool, int], list[dict]] = {}
    for defer in (False, True):
        for accum in (1, 4):
            results[defer, accum] = run_distributed(
                _measure, 2, defer, accum, size, args.seq, args.steps, timeout=1800
            )
    params = results[False, 1][0]["params"]
    print(
        f"model: {params / 1e6:.1f}M parameters ({params * 4 / MIB:.0f} MiB fp32, "
        f"{params * 2 / MIB:.0f} MiB per rank sharded); micro batch 1 x {args.seq} tokens, "
        f"{args.steps} measured steps"
    )
    cols = ("runtime", "base", "peak", "training", "ratio", "growth", "ratio")
    print(f"{'setting (MiB per rank)':<26}{'accum':>6}" + "".join(f"{c:>10}" for c in cols))
    ok = True
    for defer in (False, True):
        name = "fsdp_defer_grad_sync" if defer else "reduce every micro-batch"
        rows = {a: _summary(results[defer, a]) for a in (1, 4)}
        for accum, (runtime, base, peak) in rows.items():
            training, growth = peak - runtime, peak - base
            ratio_t = training / (rows[1][2] - rows[1][0])
            ratio_g = growth / (rows[1][2] - rows[1][1])
            values = (runtime, base, peak, training, ratio_t, growth, ratio_g)
            print(
                f"{name:<26}{accum:>6}" + "".join(f"{v:>10.2f}" if v < 10 else f"{v:>10.0f}" for v in values)
            )
            if not defer and accum == 4:
                ok = ratio_t <= GOAL
    for accum in (1, 4):
        a, b = results[False, accum][0]["losses"], results[True, accum][0]["losses"]
        diffs = [abs(x - y) / abs(y) for x, y in zip(a, b, strict=True)]
        first = next((i for i, d in enumerate(diffs) if d > 1e-6), None)
        print(
            f"accum {accum}: rank-0 losses of the {len(a)} micro-batches, default vs deferred: max rel diff "
            f"{max(diffs):.1e}" + (f" (first above 1e-6 at micro-batch {first})" if first is not None else "")
        )
    print(
        f"goal: default accumulation 4 / accumulation 1 training memory <= {GOAL}: {'met' if ok else 'NOT met'}"
    )


def _summary(ranks: list[dict]) -> tuple[float, float, float]:
    """(runtime, base, peak) MiB of the rank with the highest peak."""
    r = max(ranks, key=lambda r: r["peak_mib"])
    return r["runtime_mib"], r["base_mib"], r["peak_mib"]


if __name__ == "__main__":
    main()
