"""A cluster check before a long job: `python -m moe_recipes.distributed.probe [--use-deepspeed] [--out DIR]`
under your launcher (torchrun, mpirun, srun, the deepspeed launcher). Every rank initialises the process
group as training does, all-reduces its rank and prints one line `PROBE {json}` (rank, world size, local
rank, the sum, every peer's host); the exit code is 0 when the sum and the group size are right.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def probe(use_deepspeed: bool = False, backend: str | None = None) -> dict[str, Any]:
    """Initialise the process group as training does, all-reduce the ranks and report what every rank saw."""
    import socket

    import torch
    import torch.distributed as dist

    from moe_recipes.distributed.env import destroy_distributed, device_for, init_distributed

    env = init_distributed(backend=backend, use_deepspeed=use_deepspeed)
    try:
        total = torch.tensor([float(env.rank)], device=device_for(env))
        dist.all_reduce(total)
        me = {
            "rank": env.rank,
            "local_rank": env.local_rank,
            "host": socket.gethostname(),
            "pid": os.getpid(),
        }
        peers: list[Any] = [None] * env.world_size
        dist.all_gather_object(peers, me)
        deepspeed_knows = False
        if use_deepspeed:
            import deepspeed.comm

            deepspeed_knows = bool(deepspeed.comm.is_initialized())
        record = {
            **me,
            "world_size": env.world_size,
            "local_world_size": env.local_world_size,
            "launcher": env.launcher,
            "master_addr": env.master_addr,
            "master_port": env.master_port,
            "backend": str(dist.get_backend()),
            "group_size": dist.get_world_size(),
            "sum": total.item(),
            "expected_sum": float(sum(range(env.world_size))),
            "peers": peers,
            "deepspeed": deepspeed_knows,
        }
    finally:
        destroy_distributed()
    return record


def _probe_main(argv: Sequence[str] | None = None) -> int:
    """Command line of the probe; prints `PROBE {json}` per rank and writes OUT/rank<N>.json."""
    parser = argparse.ArgumentParser(
        prog="python -m moe_recipes.distributed.probe",
        description="Check a launcher set-up: every rank joins the process group, all-reduces its rank and "
        "prints one line `PROBE {json}` (rank, world size, local rank, sum, peers' hosts).",
    )
    parser.add_argument("--use-deepspeed", action="store_true", help="let DeepSpeed create the group")
    parser.add_argument("--backend", default=None, help="nccl / gloo (default: nccl with CUDA, else gloo)")
    parser.add_argument("--out", default=None, metavar="DIR", help="also write DIR/rank<N>.json")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    record = probe(use_deepspeed=args.use_deepspeed, backend=args.backend)
    # One write per line: under `python -u` print() would write the newline separately and the ranks'
    # lines could interleave on a shared pipe.
    sys.stdout.write("PROBE " + json.dumps(record, sort_keys=True) + "\n")
    sys.stdout.flush()
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank{record['rank']}.json").write_text(json.dumps(record, sort_keys=True))
    ok = record["sum"] == record["expected_sum"] and record["group_size"] == record["world_size"]
    return 0 if ok else 1


if __name__ == "__main__":
    from moe_recipes.distributed.env import exit_process

    sys.exit(exit_process(_probe_main()))
