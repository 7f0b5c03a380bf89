"""Which compute precision fits the hardware: `auto` picks bf16 only where the device computes it natively.

bf16 is the fast choice on GPUs with bf16 units and on CPUs with AVX-512-BF16 or AMX, but on a CPU without
them PyTorch emulates bf16 matmuls, 10-40x slower than fp32 (measured: a 2048x256 @ 256x32000 matmul took
5.2 s in bf16 and 0.58 s in fp32 on an AVX2-only EPYC). So a default of bf16 is fast on one machine and
crawls on another; `auto` asks the device instead. Training, `generate` and `eval` all resolve their
precision here, and say what they chose and why.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import dataclass

import torch

PRECISIONS = ("auto", "bf16", "fp32")
_WARNED: set[str] = set()
# Matrix multiplies that autocast (torch 2.13) has no rule for, on any device: they run in the dtype of their
# inputs. transformers' `grouped_mm` experts call torch._grouped_mm, so under autocast with fp32 weights
# (DeepSpeed's master weights) the routed experts, most of an MoE model's FLOPs, stayed in fp32.
AUTOCAST_MATMULS = ("aten::_grouped_mm",)
_AUTOCAST_RULES: dict[str, torch.library.Library] = {}


@dataclass(frozen=True)
class PrecisionChoice:
    """The resolved precision (`bf16` or `fp32`) and a short reason for the start-up line."""

    name: str
    reason: str

    @property
    def bf16(self) -> bool:
        return self.name == "bf16"

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float32

    def describe(self, requested: str) -> str:
        head = f"{requested} -> {self.name}" if requested != self.name else self.name
        return f"{head} ({self.reason})"


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """(True, why) when `device` computes bf16 matmuls in hardware; (False, why not) otherwise."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        name = torch.cuda.get_device_name(index)
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return True, f"{name} has bf16 units"
        return False, f"{name} has no bf16 units"
    if device.type != "cpu":
        return False, f"bf16 support of {device.type} devices is not known here"
    return _cpu_native_bf16()


def _cpu_native_bf16() -> tuple[bool, str]:
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
    # A process limited to AVX2 kernels computes bf16 as an AVX2-only CPU does (emulated), whatever the CPU
    # has. Both limits are honoured (ATEN_CPU_CAPABILITY for PyTorch's own kernels, ONEDNN_MAX_CPU_ISA for
    # oneDNN's matmuls), so that a run or the test suite restricted that way behaves as on such a CPU.
    aten_limit = os.environ.get("ATEN_CPU_CAPABILITY")
    capability = torch.backends.cpu.get_cpu_capability()
    if x86 and aten_limit and not capability.startswith("AVX512"):
        why = f"PyTorch's kernels are limited to {capability} (ATEN_CPU_CAPABILITY={aten_limit})"
        return False, f"{why}, bf16 would be emulated"
    # oneDNN's check honours ONEDNN_MAX_CPU_ISA; on x86 it is also true for plain AVX-512, where bf16 is
    # emulated, hence the instruction checks that follow.
    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        if onednn_limit := os.environ.get("ONEDNN_MAX_CPU_ISA"):
            why = f"oneDNN's kernels are limited to {onednn_limit} (ONEDNN_MAX_CPU_ISA)"
            return False, f"{why}, bf16 would be emulated"
        return False, "this CPU has no bf16 matmul instructions (no AVX-512-BF16/AMX), bf16 would be emulated"
    if x86:
        if torch.cpu._is_amx_tile_supported():
            return True, "this CPU has AMX"
        if torch.cpu._is_avx512_bf16_supported():
            return True, "this CPU has AVX-512-BF16"
        return False, "this CPU has AVX-512 but no AVX-512-BF16/AMX, bf16 would be emulated"
    return True, "oneDNN reports bf16 support on this CPU"


def resolve_precision(requested: str, device: torch.device) -> PrecisionChoice:
    """`auto` -> bf16 where native, else fp32; `bf16`/`fp32` as asked (bf16 on emulating hardware warns once)."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision {requested!r} is not one of {', '.join(PRECISIONS)}")
    if requested == "fp32":
        return PrecisionChoice("fp32", "as configured")
    native, why = native_bf16(device)
    if requested == "auto":
        return PrecisionChoice("bf16" if native else "fp32", why)
    if not native:
        _warn_emulated(device, why)
    return PrecisionChoice("bf16", "as configured" + ("" if native else f"; {why}"))


def autocast_every_matmul(device_type: str) -> None:
    """Give bf16 autocast on `device_type` the rule it lacks for the matmuls of `AUTOCAST_MATMULS`: cast
    floating inputs to bf16, as autocast does for `mm`/`linear` (the backward then runs in bf16 too, and the
    gradients of fp32 weights come back fp32 through the cast). Idempotent; an op that has an autocast rule
    of its own (a later torch) keeps it. Only autocast regions are affected: fp32 code never reaches the rule.
    """
    if device_type in _AUTOCAST_RULES:
        return
    key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    lib = torch.library.Library("aten", "FRAGMENT")
    for op in AUTOCAST_MATMULS:
        if not torch._C._dispatch_has_kernel_for_dispatch_key(op, key):
            torch.library.register_autocast(op, device_type, torch.bfloat16, lib=lib)
    _AUTOCAST_RULES[device_type] = lib


def _warn_emulated(device: torch.device, why: str) -> None:
    key = str(device)
    if key in _WARNED:
        return
    _WARNED.add(key)
    detail = ""
    if device.type == "cpu":
        ratio = bf16_slowdown()
        detail = f"; measured here: a bf16 matmul takes {ratio:.1f}x the time of the fp32 one"
    print(
        f"[moe-recipes] warning: bf16 was asked for, but {why}{detail}. "
        "Use precision auto (or fp32) unless you need bf16 numerics.",
        file=sys.stderr,
        flush=True,
    )


def bf16_slowdown(size: int = 512, repeat: int = 3) -> float:
    """Time of a (size x size) @ (size x size) matmul in bf16 over fp32 on the CPU (best of `repeat`)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    times = {}
    for dtype in (torch.float32, torch.bfloat16):
        x, y = a.to(dtype), b.to(dtype)
        x @ y  # warm-up: first-call dispatch and allocation
        best = float("inf")
        for _ in range(repeat):
            start = time.perf_counter()
            x @ y
            best = min(best, time.perf_counter() - start)
        times[dtype] = best
    return times[torch.bfloat16] / max(times[torch.float32], 1e-9)
