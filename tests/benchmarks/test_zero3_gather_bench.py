"""ZeRO-3 under bf16 all-gathers the matrices in bf16: the benchmark's tiny mode runs both engines (fp32
gather as before, bf16 gather now) on the same batches and its numbers must show it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import JOB_VARS

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "zero3_gather.py"


@pytest.mark.distributed
def test_zero3_gathers_matrices_in_bf16_with_the_same_losses(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in JOB_VARS}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(REPO), env.get("PYTHONPATH", "")])
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--check", "--json", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads(out.read_text())
    before, after = data["results"]["fp32-gather"], data["results"]["bf16-gather"]
    # bf16 rounding of each partition before the gather is what autocast does to the gathered weight
    assert after["losses"] == before["losses"]
    assert len(before["losses"][0]) == 3 and len(set(before["losses"][0])) == 3  # 3 steps that trained
    # before: nothing in bf16; after: the same elements gathered, part of them in bf16
    assert before["gather_bf16_payload"] == 0
    assert after["gather_bf16_payload"] > 0
    elements_before = before["gather_payload"] / 4
    elements_after = (
        after["gather_bf16_payload"] / 2 + (after["gather_payload"] - after["gather_bf16_payload"]) / 4
    )
    assert elements_after == elements_before
    assert after["gather_payload"] < before["gather_payload"]
    # gradients are still reduced in fp32 (distributed.reduce_dtype defaults to fp32)
    scatters = {k: v for k, v in after["ops"].items() if "reduce_scatter" in k}
    assert scatters and all(k.endswith(" float32") for k in scatters), after["ops"]
    assert scatters == {k: v for k, v in before["ops"].items() if "reduce_scatter" in k}
