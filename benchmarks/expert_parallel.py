"""Benchmark: step time and bytes moved per rank of expert parallelism (EP) against the other ways to shard.

Two processes (gloo, CPU) train one random Mixtral (built once from a `MixtralConfig`, no download; 8
experts top-2, --hidden, --ffn, --layers set its size, so the routed experts hold most parameters) on the
same token batches, one global batch of 2 x --micro sequences of --seq tokens per step, with every scheme:

* ``ours-ep2``: ours, FSDP2 + expert parallelism 2 (`distributed.expert_parallel_size=2`): the trainer's own
  `load_model`, `CausalLMObjective` and `initialize_fsdp`, driven by `FSDPEngine.backward/step` as the
  trainer does; each rank its own micro-batch; tokens go to their experts' rank and back by all-to-all;
* ``hf-ep-allreduce``: transformers' own EP of the all-reduce kind, `DistributedConfig(tp_size=2,
  ep_size=2, ep_implementation="all_reduce")` given to `from_pretrained`: both ranks run the same tokens
  (the TP group shares one batch, so each gets the whole global batch), each through its own 4 experts
  with the other routes masked, and the expert outputs are summed by an all-reduce; attention and the LM
  head use transformers' default tensor-parallel plan; torch AdamW;
* ``hf-ep-alltoall``: transformers' FSDP2 + EP, `DistributedConfig(fsdp_size=2, ep_size=2)`. In 5.24 its
  default `ep_implementation="auto"` takes the all-to-all path in training (the all-reduce one needs
  `ep_size == tp_size`), so this is transformers' counterpart of ours; each rank its own micro-batch;
* ``fsdp2``: ours, FSDP2 without EP (every rank all-gathers every expert);
* ``zero3``: ours, DeepSpeed ZeRO-3 without EP (`distributed.engine=deepspeed`, `zero_stage=3`).

All in fp32, SDPA attention and the `grouped_mm` experts kernel. Each scheme runs in fresh processes
(`tests.harness.run_distributed`); --rounds rounds run the schemes in turn (interleaved, so a busy moment
of a shared machine hits all of them), each round --warmup steps then --steps timed steps. A step is
forward + backward + optimizer step, timed on each rank after a barrier; the table shows the slower
rank's median over all timed steps of all rounds, and its fastest step ("best", less sensitive to other
jobs on a shared machine). Ratios are ``ours-ep2 / scheme``: < 1 means ours is
faster or moves fewer bytes. "first loss" (the mean over the ranks of the first step's loss, language
model + 0.02 x load-balancing loss) is the same model on the same tokens in every scheme, as a check.

Bytes are counted in one extra step after the timed ones (so counting costs no timed time), by a
`TorchDispatchMode` that sees every collective the process issues at the dispatcher: the `c10d::*` ops
behind `torch.distributed.all_reduce`, `all_gather_into_tensor`, `reduce_scatter_tensor`,
`all_to_all_single`, `broadcast`, ... (what FSDP2, DeepSpeed and our EP call) and the functional
`_c10d_functional::*` ops of DTensor and `all_to_all_single_autograd` (what transformers' EP and TP call),
including the ones autograd issues in C++ in the backward, which no Python wrapper of
`torch.distributed` would see. Per call it records:

* payload: the bytes of the full buffer of the collective: the tensor of an all-reduce or broadcast,
  the gathered output of an all-gather, the unreduced input of a reduce-scatter, the rows this rank
  sends in an all-to-all (its own share included);
* sent: what a bandwidth-optimal (ring) algorithm sends from this rank, over a group of g ranks:
  all-gather and reduce-scatter (g-1)/g x payload, all-reduce 2(g-1)/g x payload, all-to-all the rows
  addressed to other ranks (from the split sizes), broadcast the payload.

Each rank first checks the counter on known collectives (an all-reduce of N fp32 is 4N bytes, ...).

    PYTHONPATH=src .venv/bin/python benchmarks/expert_parallel.py [--hidden 384 --ffn 768 --layers 4 ...]
    PYTHONPATH=src .venv/bin/python benchmarks/expert_parallel.py --check      # tiny, for the tests
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
import traceback
from pathlib import Path

SCHEMES = ("ours-ep2", "hf-ep-allreduce", "hf-ep-alltoall", "fsdp2", "zero3")
DESCRIPTIONS = {
    "ours-ep2": "ours: FSDP2 + EP 2 (all-to-all)",
    "hf-ep-allreduce": "transformers: TP 2 + EP 2 all-reduce",
    "hf-ep-alltoall": "transformers: FSDP 2 + EP 2 (all-to-all)",
    "fsdp2": "ours: FSDP2, no EP",
    "zero3": "ours: DeepSpeed ZeRO-3, no EP",
}
MIB = 2**20
AUX_COEF = 0.02
LR = 1e-4
CHECK_SIZE = {"hidden": 64, "ffn": 128, "layers": 2, "vocab": 512, "heads": 4, "kv_heads": 2}


# ----------------------------------------------------------------------------------------------
# Counting the bytes of collectives
# ----------------------------------------------------------------------------------------------


def _nbytes(x) -> int:
    import torch

    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, list | tuple):
        return sum(_nbytes(t) for t in x)
    return 0


def _group_of(arg):
    """(size, rank) of a ProcessGroup argument or of a functional collective's group name."""
    import torch.distributed as dist

    if isinstance(arg, str):
        from torch.distributed.distributed_c10d import _resolve_process_group

        arg = _resolve_process_group(arg)
    elif not isinstance(arg, dist.ProcessGroup):  # the dispatcher hands ops a boxed (script) object
        arg = dist.ProcessGroup.unbox(arg)
    return arg.size(), arg.rank()


def _a2a_sent(payload: int, rows: int, splits, group: tuple[int, int]) -> float:
    """Bytes of an all-to-all's input addressed to other ranks (even chunks when no splits are given)."""
    size, rank = group
    if not splits:
        return payload * (size - 1) / size
    return payload - payload * splits[rank] / max(rows, 1)


def collective_bytes(name: str, args: tuple, kwargs: dict) -> tuple[int, float] | None:
    """(payload, sent) of one collective op call by its dispatcher name, or None when it moves no data
    (not a collective, a barrier, a wait)."""
    ns, _, base = name.partition("::")
    base = base.split(".")[0]
    if ns == "c10d":
        base = base.strip("_")
        if base in ("allreduce", "allreduce_coalesced"):
            payload, group = _nbytes(args[0]), _group_of(args[1])
            return payload, 2 * payload * (group[0] - 1) / group[0]
        if base in ("allgather_base", "allgather", "allgather_coalesced", "allgather_into_tensor_coalesced"):
            payload, group = _nbytes(args[0]), _group_of(args[2])
            return payload, payload * (group[0] - 1) / group[0]
        if base in ("reduce_scatter_base", "reduce_scatter", "reduce_scatter_tensor_coalesced"):
            payload, group = _nbytes(args[1]), _group_of(args[2])
            return payload, payload * (group[0] - 1) / group[0]
        if base == "alltoall_base":
            payload, group = _nbytes(args[1]), _group_of(args[2])
            return payload, _a2a_sent(payload, args[1].shape[0] if args[1].dim() else 1, args[4], group)
        if base == "alltoall":
            payload, group = _nbytes(args[1]), _group_of(args[2])
            return payload, payload - _nbytes(args[1][group[1]])
        if base in ("broadcast", "send", "gather", "scatter", "reduce"):
            payload = _nbytes(args[0] if base != "scatter" else args[1])
            return payload, float(payload)
        return None
    if ns in ("_c10d_functional", "_c10d_functional_autograd"):
        base = base.strip("_")
        if base in ("all_reduce", "all_reduce_coalesced"):
            payload, group = _nbytes(args[0]), _group_of(args[2])
            return payload, 2 * payload * (group[0] - 1) / group[0]
        if base in (
            "all_gather_into_tensor",
            "all_gather_into_tensor_coalesced",
            "all_gather_into_tensor_out",
        ):
            size = args[1]
            payload = _nbytes(args[0]) * size
            return payload, payload * (size - 1) / size
        if base in ("reduce_scatter_tensor", "reduce_scatter_tensor_coalesced"):
            size = args[2]
            payload = _nbytes(args[0])
            return payload, payload * (size - 1) / size
        if base == "all_to_all_single":
            x, in_splits, group_name = args[0], args[2], args[3]
            payload = _nbytes(x)
            return payload, _a2a_sent(payload, x.shape[0], in_splits, _group_of(group_name))
        if base == "broadcast":
            payload = _nbytes(args[0])
            return payload, float(payload)
        return None
    return None


def comm_counter():
    """A TorchDispatchMode that adds up `collective_bytes` per op name in `.ops` {name: [calls, payload,
    sent]}. DTensor ops are handed back (NotImplemented) so that DTensor runs them and the collectives it
    issues for them come back here, as torch's `CommDebugMode` does."""
    import torch
    from torch.distributed.tensor import DTensor
    from torch.utils._python_dispatch import TorchDispatchMode

    class CommCounter(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: dict[str, list] = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if isinstance(func, torch._ops.HigherOrderOperator):
                return func(*args, **(kwargs or {}))
            if any(t is DTensor for t in types):
                return NotImplemented
            moved = collective_bytes(func.name(), args, kwargs or {})
            if moved is not None:
                entry = self.ops.setdefault(func.name().split(".")[0], [0, 0, 0.0])
                entry[0] += 1
                entry[1] += moved[0]
                entry[2] += moved[1]
            return func(*args, **(kwargs or {}))

        def totals(self) -> tuple[int, float]:
            return sum(v[1] for v in self.ops.values()), sum(v[2] for v in self.ops.values())

    return CommCounter()


def check_counter() -> dict:
    """Count known collectives and compare with their sizes; raises AssertionError on a miscount."""
    import torch
    import torch.distributed as dist
    from torch.distributed._functional_collectives import all_to_all_single_autograd

    world, n = dist.get_world_size(), 1000
    with comm_counter() as c:
        dist.all_reduce(torch.ones(n))
    assert c.ops == {"c10d::allreduce_": [1, 4 * n, 2 * 4 * n * (world - 1) / world]}, c.ops
    with comm_counter() as c:
        dist.all_gather_into_tensor(torch.empty(world * n), torch.ones(n))
        dist.reduce_scatter_tensor(torch.empty(n), torch.ones(world * n))
    assert c.totals() == (2 * 4 * world * n, 2 * 4 * n * (world - 1)), c.ops
    # 3 rows of 10 fp32 to every rank, forward and the backward autograd runs in C++: 2 calls
    x = torch.ones(3 * world, 10, requires_grad=True)
    with comm_counter() as c:
        y = all_to_all_single_autograd(x, [3] * world, [3] * world, dist.group.WORLD)
        y.sum().backward()
    calls = sum(v[0] for v in c.ops.values())
    assert calls == 2 and c.totals() == (2 * 4 * 30 * world, 2 * 4 * 30 * (world - 1)), c.ops
    return {"ok": True}


# ----------------------------------------------------------------------------------------------
# One scheme on one rank
# ----------------------------------------------------------------------------------------------


def _batches(vocab: int, micro: int, seq: int, count: int, world: int):
    """`count` global batches (world x micro, seq) of random token ids, the same for every scheme."""
    import torch

    gen = torch.Generator().manual_seed(1234)
    return [torch.randint(0, vocab, (world * micro, seq), generator=gen) for _ in range(count)]


def _ours(scheme: str, model_dir: str, micro: int):
    """A step function of ours (FSDP2 with or without EP, ZeRO-3) and this rank's slice of a batch."""
    import torch
    import torch.distributed as dist

    from moe_recipes.config import Config
    from moe_recipes.engines.deepspeed_zero import deepspeed_config, initialize
    from moe_recipes.engines.fsdp2 import initialize_fsdp
    from moe_recipes.models.inspect import inspect_model
    from moe_recipes.models.loading import load_model
    from moe_recipes.train.objective import CausalLMObjective, loss_chunk_tokens

    world, rank = dist.get_world_size(), dist.get_rank()
    cfg = Config()
    cfg.train.precision = "fp32"
    cfg.train.micro_batch_size = micro
    cfg.train.global_batch_size = micro * world
    cfg.optim.lr = LR
    cfg.distributed.engine = "deepspeed" if scheme == "zero3" else "fsdp2"
    cfg.distributed.zero_stage = 3
    cfg.distributed.expert_parallel_size = 2 if scheme == "ours-ep2" else 1
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
        bf16=False,
        fused_head=False,
    )
    if scheme == "zero3":
        from moe_recipes.distributed.env import _skip_deepspeed_shm_op

        _skip_deepspeed_shm_op()  # as the trainer does: no JIT build of an op that training never uses
        engine, _ = initialize(objective, cfg, deepspeed_config(cfg, world), info.moe_block_classes)
    else:
        engine, _ = initialize_fsdp(objective, cfg, info, 1, torch.device("cpu"))

    def step(ids: torch.Tensor) -> float:
        # The trainer's labels come shifted by the data pipeline; transformers shifts inside the model.
        labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
        out = engine(input_ids=ids, labels=labels)
        loss = out["lm_loss_sum"] / out["tokens"] + out["moe_loss"]
        engine.backward(loss)
        engine.step()
        return float(loss.detach())

    return step, lambda batch: batch[rank * micro : (rank + 1) * micro]


def _transformers(scheme: str, model_dir: str, micro: int):
    """A step function of transformers' own EP (from_pretrained with a DistributedConfig) and the batch
    each rank feeds it: the whole global batch with TP (both ranks share it), its own slice with FSDP."""
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    rank = dist.get_rank()
    if scheme == "hf-ep-allreduce":
        dc = DistributedConfig(tp_size=2, ep_size=2, ep_implementation="all_reduce")
    else:
        dc = DistributedConfig(fsdp_size=2, ep_size=2)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        distributed_config=dc,
        dtype=torch.float32,
        attn_implementation="sdpa",
        experts_implementation="grouped_mm",
    )
    model.config.use_cache = False
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)

    def step(ids: torch.Tensor) -> float:
        out = model(input_ids=ids, labels=ids, output_router_logits=True)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    if scheme == "hf-ep-allreduce":
        return step, lambda batch: batch
    return step, lambda batch: batch[rank * micro : (rank + 1) * micro]


def measure(scheme: str, model_dir: str, size: dict, micro: int, seq: int, warmup: int, steps: int) -> dict:
    """One rank of one scheme: check the counter, build, `warmup` + `steps` timed steps, one counted step."""
    import torch
    import torch.distributed as dist

    check_counter()
    torch.manual_seed(0)
    build = _ours if scheme in ("ours-ep2", "fsdp2", "zero3") else _transformers
    step, mine = build(scheme, model_dir, micro)
    batches = _batches(size["vocab"], micro, seq, warmup + steps + 1, dist.get_world_size())
    times, losses = [], []
    for i, batch in enumerate(batches[:-1]):
        dist.barrier()
        start = time.perf_counter()
        losses.append(step(mine(batch)))
        if i >= warmup:
            times.append(time.perf_counter() - start)
    dist.barrier()
    with comm_counter() as counter:
        step(mine(batches[-1]))
    payload, sent = counter.totals()
    return {"times": times, "losses": losses, "payload": payload, "sent": sent, "ops": counter.ops}


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


def build_model(model_dir: Path, size: dict, seq: int) -> int:
    """Write the random Mixtral every scheme loads; returns its parameter count."""
    import torch
    from transformers import AutoModelForCausalLM, MixtralConfig

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
    return sum(p.numel() for p in model.parameters())


def run(args: argparse.Namespace) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for tests.harness
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")  # torch's deprecation notes, per call
    from tests.harness import run_distributed

    size = dict(CHECK_SIZE) if args.check else {
        "hidden": args.hidden, "ffn": args.ffn, "layers": args.layers, "vocab": args.vocab,
        "heads": args.heads, "kv_heads": args.kv_heads,
    }  # fmt: skip
    results: dict[str, dict] = {s: {"rounds": []} for s in args.schemes}
    with tempfile.TemporaryDirectory(prefix="ep_bench_") as tmp:
        model_dir = Path(tmp) / "model"
        params = build_model(model_dir, size, args.seq)
        for round_ in range(args.rounds):
            for scheme in args.schemes:
                r = results[scheme]
                if "error" in r:
                    continue
                print(f"round {round_ + 1}/{args.rounds}: {scheme}", file=sys.stderr, flush=True)
                # A second try after a failure: on this machine a rank of the DeepSpeed run once died with
                # "terminate called without an active exception" (SIGABRT) and the rerun passed.
                for attempt in range(2):
                    try:
                        ranks = run_distributed(
                            measure, 2, scheme, str(model_dir), size, args.micro, args.seq, args.warmup,
                            args.steps, timeout=args.timeout,
                        )  # fmt: skip
                        break
                    except Exception as err:
                        # the rank's own exception first, then the traceback text the harness attached
                        text = "".join(traceback.format_exception_only(type(err), err)).strip()
                        first = (text.splitlines() or [repr(err)])[0][:300]
                        r.setdefault("failures", []).append(first)
                        if attempt == 1:
                            r["error"], r["error_text"] = first, f"{text}\n{err.__cause__ or ''}"
                if "error" in r:
                    continue
                r["rounds"].append(ranks)
                r["first_loss"] = statistics.mean(x["losses"][0] for x in ranks)
                r["payload"] = max(x["payload"] for x in ranks)
                r["sent"] = max(x["sent"] for x in ranks)
                r["ops"] = ranks[0]["ops"]
        for r in results.values():
            if r["rounds"]:
                per_rank = [[t for ranks in r["rounds"] for t in ranks[i]["times"]] for i in range(2)]
                r["step_s"] = max(statistics.median(ts) for ts in per_rank)
                r["best_s"] = max(min(ts) for ts in per_rank)
                r["times"] = per_rank
            r.pop("rounds")
    return {"params": params, "size": size, "micro": args.micro, "seq": args.seq, "results": results}


def report(out: dict, args: argparse.Namespace) -> None:
    res, base = out["results"], out["results"].get("ours-ep2", {})
    tokens = 2 * out["micro"] * out["seq"]
    print(
        f"model: Mixtral, 8 experts top-2, {out['size']}, {out['params'] / 1e6:.1f}M parameters; global batch "
        f"2 x {out['micro']} x {out['seq']} = {tokens} tokens per step; {args.rounds} round(s) of "
        f"{args.warmup} warm-up + {args.steps} timed steps"
    )
    head = ("scheme", "step s", "ours/this", "best s", "ours/this", "payload MiB", "sent MiB", "ours/this",
            "first loss")  # fmt: skip
    print(f"{head[0]:<18}" + "".join(f"{h:>12}" for h in head[1:]))
    for scheme in args.schemes:
        r = res[scheme]
        name = scheme
        if "error" in r:
            print(f"{name:<18}  not measured: {r['error']}")
            continue
        t_ratio = base.get("step_s", float("nan")) / r["step_s"]
        best_ratio = base.get("best_s", float("nan")) / r["best_s"]
        b_ratio = base.get("sent", float("nan")) / r["sent"] if r["sent"] else float("nan")
        cells = (f"{r['step_s']:.3f}", f"{t_ratio:.2f}", f"{r['best_s']:.3f}", f"{best_ratio:.2f}",
                 f"{r['payload'] / MIB:.2f}", f"{r['sent'] / MIB:.2f}", f"{b_ratio:.2f}",
                 f"{r['first_loss']:.4f}")  # fmt: skip
        print(f"{name:<18}" + "".join(f"{c:>12}" for c in cells))
    for scheme in args.schemes:
        print(f"  {scheme}: {DESCRIPTIONS[scheme]}")
    print("collectives per rank in one step (rank 0): op calls payload-MiB sent-MiB")
    for scheme in args.schemes:
        ops = res[scheme].get("ops", {})
        text = ", ".join(f"{k} {v[0]} {v[1] / MIB:.2f} {v[2] / MIB:.2f}" for k, v in sorted(ops.items()))
        print(f"  {scheme}: {text or '-'}")
    for scheme in args.schemes:
        for failure in res[scheme].get("failures", []):
            print(
                f"note: a run of {scheme} failed ({failure})" + ("" if "error" in res[scheme] else "; rerun")
            )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--ffn", type=int, default=768, help="each expert's intermediate size")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--micro", type=int, default=2, help="sequences per rank per step")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=SCHEMES)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per scheme run")
    parser.add_argument("--check", action="store_true", help="a tiny model, 1 round of 1+1 steps")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.check:
        args.micro, args.seq, args.warmup, args.steps, args.rounds = 1, 32, 1, 1, 1
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; 2 processes (gloo)")
    out = run(args)
    report(out, args)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
