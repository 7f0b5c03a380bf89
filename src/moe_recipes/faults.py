"""Fault injection at named points of a run, for the fault-injection suite (tests/faults).

`MOE_RECIPES_FAULT=point=NAME[,iter=N][,rank=R][,action=kill|sleep:SECONDS|raise]` (several joined by `;`)
makes the process that reaches `fault_point(NAME, N)` on rank R kill itself with SIGKILL (the default),
sleep, or raise. Unset, `fault_point` is a dictionary lookup and nothing else.
"""

from __future__ import annotations

import os
import signal
import sys
import time

FAULT_ENV = "MOE_RECIPES_FAULT"
# Named moments of a checkpoint save, in order (see train.checkpoint.save_checkpoint)
SAVE_POINTS = (
    "engine_saved",  # this rank's engine files are in iter_N.tmp, run_state.json is not
    "before_rename",  # iter_N.tmp is complete
    "after_rename",  # iter_N is in place, `latest` still names the previous one
    "latest_written",  # latest.tmp is written, not yet renamed over `latest`
    "after_latest",  # `latest` names iter_N, old checkpoints not pruned yet
    "mid_prune",  # an old checkpoint's run_state.json is gone, its files are not
)
# Named moments of a training step (see train.trainer)
STEP_POINTS = (
    "step_start",  # before the step's first forward (the other ranks go on into the step's collectives)
    "before_reduce",  # the step's backward passes are done, its loss all-reduce not yet entered
)


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def fault_point(point: str, iteration: int) -> None:
    """Inject the fault that MOE_RECIPES_FAULT asks for at `point` (nothing when it is unset)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    for item in spec.split(";"):
        fields = dict(kv.split("=", 1) for kv in item.split(",") if "=" in kv)
        if fields.get("point") != point:
            continue
        if "iter" in fields and int(fields["iter"]) != iteration:
            continue
        if "rank" in fields and int(fields["rank"]) != _rank():
            continue
        action = fields.get("action", "kill")
        print(
            f"[moe-recipes] fault injection: {action} at {point}, step {iteration}, rank {_rank()}",
            file=sys.stderr,
            flush=True,
        )
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action.startswith("sleep:"):
            time.sleep(float(action.split(":", 1)[1]))
        elif action == "raise":
            raise RuntimeError(f"fault injected at {point}")
