"""Benchmark: bytes DeepSpeed ZeRO-3 moves per training step under bf16, parameters gathered in fp32 (before)
and in bf16 (after, `engines.deepspeed_zero.gather_in_bf16`), with the losses of both runs.

Two processes (gloo, CPU) train one random Mixtral (built from a `MixtralConfig`, no download; 8 experts
top-2; --hidden, --ffn, --layers, --vocab set its size; with the defaults the matrices hold 98% of the
parameters, as in released MoE models, where the input embedding is well under 1%) with our trainer's
pieces (`load_model`, `CausalLMObjective`, `engines.deepspeed_zero.initialize`) at `train.precision=bf16`, ZeRO-3, on
the same random token batches:

* ``fp32-gather``: the engine as it was, every parameter all-gathered in fp32 (`gather_in_bf16` disabled);
* ``bf16-gather``: the engine now, the matrices but the input embedding all-gathered in bf16.

Collectives are counted at the dispatcher (`benchmarks/expert_parallel.py`'s counter, which sees the
`c10d::*` ops DeepSpeed issues, backward included) in one step after the timed ones, by op and dtype:
payload is the full buffer (the gathered output of an all-gather, the unreduced input of a
reduce-scatter); "sent" is what a ring algorithm sends from one rank, (g-1)/g of it. The losses of every
step are printed for both runs: bf16 rounding of a partition before the gather is the rounding autocast
applies to the gathered fp32 weight, so they must be equal bit for bit.

    PYTHONPATH=src:. .venv/bin/python benchmarks/zero3_gather.py [--hidden 512 --ffn 1024 --layers 4 ...]
    PYTHONPATH=src:. .venv/bin/python benchmarks/zero3_gather.py --check      # tiny, for the tests
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("fp32-gather", "bf16-gather")
MIB = 2**20
AUX_COEF = 0.02
CHECK_SIZE = {"hidden": 64, "ffn": 128, "layers": 2, "vocab": 256, "heads": 4, "kv_heads": 2}


def measure(variant: str, model_dir: str, vocab: int, micro: int, seq: int, warmup: int, steps: int) -> dict:
    """One rank of one variant: build the engine, `warmup` + `steps` timed steps, one counted step."""
    import torch
    import torch.distributed as dist
    from benchmarks.expert_parallel import _batches, check_counter, collective_bytes

    from moe_recipes.config import Config
    from moe_recipes.distributed.env import _skip_deepspeed_shm_op
    from moe_recipes.engines import deepspeed_zero as ds_engine
    from moe_recipes.models.inspect import inspect_model
    from moe_recipes.models.loading import load_model
    from moe_recipes.train.objective import CausalLMObjective, loss_chunk_tokens

    check_counter()
    torch.manual_seed(0)
    world, rank = dist.get_world_size(), dist.get_rank()
    cfg = Config()
    cfg.train.precision = "bf16"
    cfg.train.micro_batch_size = micro
    cfg.train.global_batch_size = micro * world
    cfg.distributed.engine = "deepspeed"
    cfg.distributed.zero_stage = 3
    if variant == "fp32-gather":
        ds_engine.gather_in_bf16 = lambda params: None  # the engine before: no parameter marked
    model = load_model(model_dir)
    model.config.use_cache = False
    model.train()
    info = inspect_model(model)
    objective = CausalLMObjective(
        model,
        info,
        aux_coef=AUX_COEF,
        z_coef=0.0,
        chunk_size=loss_chunk_tokens(None, model.config.vocab_size),
        bf16=True,
        fused_head=False,
    )
    _skip_deepspeed_shm_op()  # as the trainer does
    engine, _ = ds_engine.initialize(
        objective, cfg, ds_engine.deepspeed_config(cfg, world), info.moe_block_classes,
        model.get_input_embeddings(),
    )  # fmt: skip

    def step(ids: torch.Tensor) -> float:
        labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
        out = engine(input_ids=ids, labels=labels)
        loss = out["lm_loss_sum"] / out["tokens"] + out["moe_loss"]
        engine.backward(loss)
        engine.step()
        return float(loss.detach())

    batches = _batches(vocab, micro, seq, warmup + steps + 1, world)
    times, losses = [], []
    for i, batch in enumerate(batches[:-1]):
        dist.barrier()
        start = time.perf_counter()
        losses.append(step(batch[rank * micro : (rank + 1) * micro]))
        if i >= warmup:
            times.append(time.perf_counter() - start)
    dist.barrier()
    with _dtype_counter(collective_bytes) as counter:
        losses.append(step(batches[-1][rank * micro : (rank + 1) * micro]))
    return {"times": times, "losses": losses, "ops": counter.ops}


def _dtype_counter(collective_bytes):
    """A TorchDispatchMode adding up `collective_bytes` per (op, dtype) in `.ops` {"op dtype": [calls,
    payload, sent]}; the dtype is that of the op's first tensor argument."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    def first_dtype(x) -> str:
        if isinstance(x, torch.Tensor):
            return str(x.dtype).removeprefix("torch.")
        if isinstance(x, (list, tuple)):
            for y in x:
                if (found := first_dtype(y)) != "?":
                    return found
        return "?"

    class Counter(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: dict[str, list] = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            moved = collective_bytes(func.name(), args, kwargs or {})
            if moved is not None:
                key = f"{func.name().split('.')[0]} {first_dtype(args)}"
                entry = self.ops.setdefault(key, [0, 0, 0.0])
                entry[0] += 1
                entry[1] += moved[0]
                entry[2] += moved[1]
            return func(*args, **(kwargs or {}))

    return Counter()


def build_model(model_dir: Path, size: dict, seq: int) -> dict:
    """Write the random Mixtral both variants load; returns its parameter counts."""
    import torch
    from transformers import AutoModelForCausalLM, MixtralConfig

    from moe_recipes.engines.deepspeed_zero import gathered_in_bf16

    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=size["vocab"],
        hidden_size=size["hidden"],
        intermediate_size=size["ffn"],
        num_hidden_layers=size["layers"],
        num_attention_heads=size["heads"],
        num_key_value_heads=size["kv_heads"],
        num_local_experts=8,
        num_experts_per_tok=2,
        router_aux_loss_coef=AUX_COEF,
        max_position_embeddings=max(seq, 128),
        tie_word_embeddings=False,
    )
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(model_dir)
    bf16 = sum(p.numel() for p in gathered_in_bf16(model, model.get_input_embeddings()))
    return {"params": sum(p.numel() for p in model.parameters()), "bf16_params": bf16}


def _gathered(ops: dict, dtype: str | None = None) -> tuple[int, float]:
    """(payload, sent) of the all-gathers in `ops`, of one dtype or all."""
    rows = [v for k, v in ops.items() if "allgather" in k and (dtype is None or k.endswith(" " + dtype))]
    return sum(v[1] for v in rows), sum(v[2] for v in rows)


def run(args: argparse.Namespace) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for tests.harness
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")
    from tests.harness import run_distributed

    size = dict(CHECK_SIZE) if args.check else {
        "hidden": args.hidden, "ffn": args.ffn, "layers": args.layers, "vocab": args.vocab,
        "heads": args.heads, "kv_heads": args.kv_heads,
    }  # fmt: skip
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="zero3_gather_") as tmp:
        model_dir = Path(tmp) / "model"
        counts = build_model(model_dir, size, args.seq)
        for variant in VARIANTS:
            print(f"{variant} ...", file=sys.stderr, flush=True)
            ranks = run_distributed(
                measure, 2, variant, str(model_dir), size["vocab"], args.micro, args.seq, args.warmup,
                args.steps, timeout=args.timeout,
            )  # fmt: skip
            r = {"losses": [x["losses"] for x in ranks], "ops": ranks[0]["ops"]}
            r["step_s"] = max(statistics.median(x["times"]) for x in ranks)
            r["gather_payload"], r["gather_sent"] = _gathered(r["ops"])
            r["gather_bf16_payload"], _ = _gathered(r["ops"], "bfloat16")
            r["payload"] = sum(v[1] for v in r["ops"].values())
            r["sent"] = sum(v[2] for v in r["ops"].values())
            results[variant] = r
    return {**counts, "size": size, "micro": args.micro, "seq": args.seq, "results": results}


def report(out: dict) -> None:
    res = out["results"]
    before, after = res["fp32-gather"], res["bf16-gather"]
    print(
        f"model: Mixtral, 8 experts top-2, {out['size']}, {out['params'] / 1e6:.2f}M parameters, "
        f"{out['bf16_params'] / out['params']:.1%} of them gathered in bf16; ZeRO-3, 2 ranks, bf16 compute, "
        f"{2 * out['micro']} x {out['seq']} tokens per step"
    )
    print(f"{'variant':<13}{'step s':>9}{'gathered MiB':>14}{'of it bf16':>12}{'all sent MiB':>14}")
    for name in VARIANTS:
        r = res[name]
        print(
            f"{name:<13}{r['step_s']:>9.3f}{r['gather_payload'] / MIB:>14.2f}"
            f"{r['gather_bf16_payload'] / MIB:>12.2f}{r['sent'] / MIB:>14.2f}"
        )
    print(
        f"bf16-gather / fp32-gather: all-gather bytes {after['gather_payload'] / before['gather_payload']:.3f}, "
        f"all bytes sent {after['sent'] / before['sent']:.3f}, step time {after['step_s'] / before['step_s']:.2f}"
    )
    same = before["losses"] == after["losses"]
    print(f"losses of every step and rank equal bit for bit: {same}")
    for name in VARIANTS:
        ops = res[name]["ops"]
        print(f"  {name}: " + ", ".join(f"{k} {v[0]} {v[1] / MIB:.2f}" for k, v in sorted(ops.items())))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--ffn", type=int, default=1024, help="each expert's intermediate size")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--micro", type=int, default=1, help="sequences per rank per step")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per variant run")
    parser.add_argument("--check", action="store_true", help="a tiny model, 1+1 steps")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.check:
        args.micro, args.seq, args.warmup, args.steps = 1, 16, 1, 1
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; 2 processes (gloo)")
    out = run(args)
    report(out)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
