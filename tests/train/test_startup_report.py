"""The start-up and first-step lines of a real training run: their numbers parse and agree with each other.

The runs are fresh processes under torchrun (1 and 2 gloo ranks), so "after process start" is measured from
the launch of each rank, not from the test session's own start.
"""

from __future__ import annotations

import re
import time

import pytest
import torch

from moe_recipes.train.metrics import per_rank_text, process_age_seconds
from tests.harness import run_cli_distributed

from .utils import write_config

pytestmark = pytest.mark.distributed

STARTUP = re.compile(
    r"\[moe-recipes\] start-up (?P<setup>[\d.]+) s, (?P<age>[\d.]+) s after process start \((?P<how>[^)]*)\); "
    r"peak host memory per rank: (?P<host>.*) GiB$",
    re.M,
)
FIRST = re.compile(
    r"\[moe-recipes\] first step of this process \(step (?P<step>\d+)\) done (?P<age>[\d.]+) s after process "
    r"start \(start-up (?P<setup>[\d.]+) s, the step (?P<took>[\d.]+) s\); peak device memory per rank: "
    r"(?P<device>.*); peak host memory per rank: (?P<host>.*) GiB$",
    re.M,
)
# one run per engine start: DeepSpeed loads the whole model on each rank, FSDP2 starts sharded
RUNS = {
    1: ["distributed.zero_stage=2"],
    2: ["distributed.engine=fsdp2"],
}


def _ranks(text: str) -> dict[int, float]:
    """`rank 0 1.21, rank 1 1.19` -> {0: 1.21, 1: 1.19}."""
    return {int(r): float(v) for r, v in re.findall(r"rank (\d+) ([\d.]+)", text)}


@pytest.mark.parametrize("world_size", sorted(RUNS))
def test_startup_and_first_step_lines(tmp_path, tiny_mixtral, tiny_dataset, world_size):
    config = write_config(
        tmp_path, tiny_mixtral, tiny_dataset, "train.iters=2", "eval.iters=0", *RUNS[world_size]
    )
    launched = time.monotonic()
    out = run_cli_distributed(["train", str(config)], world_size=world_size, launcher="torchrun", timeout=600)
    wall = time.monotonic() - launched
    start, first = STARTUP.findall(out.stdout), FIRST.findall(out.stdout)
    assert len(start) == 1 and len(first) == 1, out.stdout  # printed once, by rank 0
    s, f = STARTUP.search(out.stdout), FIRST.search(out.stdout)
    print(s.group(0), f.group(0), sep="\n")

    setup, age = float(s["setup"]), float(s["age"])
    # set-up is part of the process's life, which began inside this launch (not at the test session's start)
    assert 0 < setup <= age + 0.05 and age < wall
    host_at_start = _ranks(s["host"])
    assert sorted(host_at_start) == list(range(world_size))
    total_ram = int(open("/proc/meminfo").readline().split()[1]) * 1024 / 2**30
    assert all(0.1 < v < total_ram for v in host_at_start.values())  # torch alone takes > 0.1 GiB
    sharded = world_size > 1
    assert ("each rank read only its shards" in s["how"]) == sharded

    assert int(f["step"]) == 1 and float(f["setup"]) == setup
    done, took = float(f["age"]), float(f["took"])
    # the first step ends after the start-up ended and at least the step's own time later (0.1 s rounding)
    assert setup <= age <= done < wall and done >= age + took - 0.15
    host_at_step = _ranks(f["host"])
    assert sorted(host_at_step) == list(range(world_size))
    assert all(host_at_step[r] >= host_at_start[r] for r in host_at_start)  # a peak never goes down
    assert f["device"].startswith("none, a cpu run")  # honest on CPU: there is no device memory to report


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_first_step_reports_cuda_memory_per_rank(tmp_path, tiny_mixtral, tiny_dataset):
    config = write_config(
        tmp_path, tiny_mixtral, tiny_dataset, "train.iters=2", "eval.iters=0", "distributed.engine=fsdp2"
    )
    out = run_cli_distributed(["train", str(config)], world_size=1, launcher="torchrun", timeout=600)
    f = FIRST.search(out.stdout)
    assert f is not None, out.stdout
    assert f["device"].startswith("(torch.cuda.max_memory_allocated)")
    device = _ranks(f["device"])
    assert sorted(device) == [0] and device[0] > 0


def test_per_rank_text_names_every_rank_or_the_extremes():
    assert _ranks(per_rank_text([1.0, 2.5])) == {0: 1.0, 1: 2.5}
    many = [1.0] * 64
    many[5], many[17] = 0.5, 3.25
    assert per_rank_text(many) == "min 0.50 GiB (rank 5), max 3.25 GiB (rank 17) over 64 ranks"


def test_process_age_is_this_process_life():
    import subprocess
    import sys

    code = "import time; time.sleep(1.0); from moe_recipes.train.metrics import process_age_seconds as a; print(a())"
    launched = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    wall = time.monotonic() - launched
    assert 1.0 <= float(out.stdout) <= wall  # counted from the launch, not from the import
    assert process_age_seconds() > 0
