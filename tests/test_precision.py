"""train.precision=auto and the dtype of generate/eval: bf16 only where the device computes it natively."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch

from moe_recipes import precision as precision_mod
from moe_recipes.infer.generate import pick_dtype
from moe_recipes.precision import resolve_precision

CPU = torch.device("cpu")
# Restricts PyTorch's and oneDNN's kernels to AVX2, as on a CPU without AVX-512-BF16/AMX: bf16 matmuls are
# then emulated (10-40x slower than fp32), which is exactly the machine `auto` must not choose bf16 on.
AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def _run(code: str, env: dict[str, str], only: bool = False) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter with `env` added (`only`: and no other AVX2 limit of this process)."""
    base = {k: v for k, v in os.environ.items() if not (only and k in AVX2_ONLY)}
    return subprocess.run(
        [sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True, timeout=120
    )


def test_auto_picks_fp32_on_a_cpu_without_bf16_units_and_bf16_warns_with_a_measurement():
    code = (
        "import torch; from moe_recipes.precision import resolve_precision as r\n"
        "c = r('auto', torch.device('cpu')); print(c.name, '|', c.reason)\n"
        "for _ in range(2): b = r('bf16', torch.device('cpu'))\n"
        "print(b.name, '|', b.reason)\n"
    )
    run = _run(code, AVX2_ONLY)
    assert run.returncode == 0, run.stderr
    auto, explicit = run.stdout.strip().splitlines()
    assert auto.startswith("fp32 | ") and auto.endswith("bf16 would be emulated")
    assert explicit.startswith("bf16 | as configured; ") and explicit.endswith("bf16 would be emulated")
    assert run.stderr.count("warning: bf16 was asked for") == 1  # once per process
    ratio = float(run.stderr.split("takes ")[1].split("x the time")[0])
    assert ratio > 1.0  # emulated bf16 is slower than fp32: the warning states what was measured


@pytest.mark.parametrize("limit", [{"ATEN_CPU_CAPABILITY": "avx2"}, {"ONEDNN_MAX_CPU_ISA": "AVX2"}])
def test_either_avx2_limit_alone_makes_bf16_emulated(limit):
    """Each variable alone limits the kernels bf16 would run on; the reason names it, whatever the CPU."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("AVX2 limits exist on x86 only")
    code = "import torch; from moe_recipes.precision import native_bf16; print(*native_bf16(torch.device('cpu')))"
    run = _run(code, limit, only=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("False ") and "bf16 would be emulated" in run.stdout
    assert next(iter(limit)) in run.stdout


@pytest.mark.parametrize(
    ("native", "expected"),
    [((True, "this CPU has AMX"), "bf16"), ((False, "this CPU has no bf16 matmul instructions"), "fp32")],
)
def test_auto_follows_the_hardware_check(monkeypatch, native, expected):
    monkeypatch.setattr(precision_mod, "native_bf16", lambda device: native)
    choice = resolve_precision("auto", CPU)
    assert (choice.name, choice.reason) == (expected, native[1])
    assert choice.describe("auto") == f"auto -> {expected} ({native[1]})"
    assert pick_dtype("auto", CPU) == (torch.bfloat16 if expected == "bf16" else torch.float32)
    assert pick_dtype("fp32", CPU) == torch.float32


def test_explicit_choices_are_kept():
    assert resolve_precision("fp32", CPU).name == "fp32"
    with pytest.raises(ValueError, match="precision 'fp16' is not one of auto, bf16, fp32"):
        resolve_precision("fp16", CPU)


def test_this_machine_is_classified_by_its_instructions():
    """The check agrees with the CPU's own instruction flags (Linux): bf16 only with AVX-512-BF16 or AMX, and
    not in a process limited to AVX2 (how the suite reproduces an AVX2-only CPU on any machine)."""
    flags = open("/proc/cpuinfo").read().split() if os.path.exists("/proc/cpuinfo") else []
    if not flags or not any(f in flags for f in ("avx2", "sse4_2")):
        pytest.skip("not an x86 Linux machine: /proc/cpuinfo has no x86 flags")
    has_units = "avx512_bf16" in flags or "amx_tile" in flags
    limited = any(os.environ.get(name, "").upper() == value.upper() for name, value in AVX2_ONLY.items())
    native, why = precision_mod.native_bf16(CPU)
    assert native == (has_units and not limited), why  # a process limited to AVX2 is an AVX2-only CPU


def test_training_start_line_says_what_auto_chose(tmp_path, tiny_mixtral, tiny_dataset):
    from .train.utils import write_config

    config = write_config(
        tmp_path, tiny_mixtral, tiny_dataset, "train.iters=1", "eval.iters=0", "train.precision=auto"
    )
    code = "import sys; from moe_recipes.cli import main; sys.exit(main(sys.argv[1:]))"
    run = subprocess.run(
        [sys.executable, "-c", code, "train", str(config)],
        env={**os.environ, **AVX2_ONLY},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    line = next(x for x in run.stdout.splitlines() if "precision auto" in x)
    assert "precision auto -> fp32 (" in line and "bf16 would be emulated)" in line


def test_grouped_mm_gets_the_autocast_rule_of_a_matmul_and_fp32_code_is_untouched():
    """autocast has no rule for torch._grouped_mm (the `grouped_mm` experts): with the rule it runs in bf16
    under bf16 autocast, fp32 weights get fp32 gradients, and fp32 code gives the same bits as before."""
    code = """
import torch
from moe_recipes.precision import autocast_every_matmul
g = torch.Generator().manual_seed(0)
x = torch.randn(24, 32, generator=g, requires_grad=True)
w = torch.randn(3, 32, 16, generator=g, requires_grad=True)
offs = torch.tensor([5, 13, 24], dtype=torch.int32)

def run(autocast):
    x.grad = w.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = torch._grouped_mm(x, w, offs=offs)
    y.float().square().sum().backward()
    return y, x.grad.clone(), w.grad.clone()

before = run(False)
print("without rule", run(True)[0].dtype)
autocast_every_matmul("cpu")
autocast_every_matmul("cpu")  # idempotent
after = run(False)
print("fp32 unchanged", all(torch.equal(a, b) for a, b in zip(before, after)))
y, gx, gw = run(True)
print("with rule", y.dtype, gx.dtype, gw.dtype)
"""
    run = _run(code, {})
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [
        "without rule torch.float32",
        "fp32 unchanged True",
        "with rule torch.bfloat16 torch.float32 torch.float32",
    ]
