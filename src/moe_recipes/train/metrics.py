"""Run metrics: one console line per log step, `metrics.jsonl`, TensorBoard and (optionally) W&B."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

# Dense bf16 peak TFLOP/s per device, for MFU. Devices not listed report no MFU unless
# log.peak_tflops is given; MFU is only meaningful against the chip's own peak.
_PEAK_BF16_TFLOPS = {
    "H100": 989.0,
    "H200": 989.0,
    "A100": 312.0,
    "B200": 2250.0,
    "GH200": 989.0,
    "L40S": 362.0,
}


def device_peak_tflops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, value in _PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


def peak_memory_gb() -> float:
    """Peak memory of this process: CUDA allocations on a GPU, else the peak resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return peak_rss_bytes() / 2**30


def peak_rss_bytes() -> int:
    """Peak resident set of this process since it started its program: VmHWM on Linux. Not ru_maxrss,
    which Linux carries across exec, so a process started by a large one (a test session, a launcher)
    would report its parent's size at the fork."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


_IMPORTED_AT = time.monotonic()  # fallback origin where /proc cannot say when the process started


def process_age_seconds() -> float:
    """Seconds since this process started (its launch: the rank's own process under torchrun or mpirun).

    Linux: the process's start time (`/proc/self/stat`, clock ticks since boot) against the time since boot
    (`/proc/uptime`), both on the boot clock, 10 ms resolution. Elsewhere: since this module was first
    imported, which is later than the launch (an underestimate by the imports before it).
    """
    try:
        stat = Path("/proc/self/stat").read_text()
        # field 22, starttime; split after the name, which may hold spaces
        start_ticks = int(stat.rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(uptime - start_ticks / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError):
        return time.monotonic() - _IMPORTED_AT


def per_rank_text(values: list[float], unit: str = "GiB", each_up_to: int = 8) -> str:
    """`rank 0 1.21, rank 1 1.19 GiB` for a few ranks; min and max (with their ranks) for many."""
    if len(values) <= each_up_to:
        return ", ".join(f"rank {r} {v:.2f}" for r, v in enumerate(values)) + f" {unit}"
    low = min(range(len(values)), key=values.__getitem__)
    high = max(range(len(values)), key=values.__getitem__)
    return (
        f"min {values[low]:.2f} {unit} (rank {low}), max {values[high]:.2f} {unit} (rank {high}) "
        f"over {len(values)} ranks"
    )


def expert_load_summary(counts: torch.Tensor) -> tuple[list[list[float]], list[float]]:
    """(layers, E) token-slot counts -> per-layer shares and max/mean imbalance (1.0 = perfectly even)."""
    counts = counts.double()
    totals = counts.sum(-1, keepdim=True).clamp(min=1)
    shares = counts / totals
    mean = counts.mean(-1).clamp(min=1e-12)
    imbalance = counts.max(-1).values / mean
    return [[round(v, 5) for v in row] for row in shares.tolist()], [round(v, 4) for v in imbalance.tolist()]


class MetricsWriter:
    """Writes records on the main rank; other ranks get a writer that does nothing."""

    def __init__(
        self,
        log_dir: str | Path,
        enabled: bool,
        tensorboard: bool,
        wandb_project: str | None,
        config: dict[str, Any],
    ):
        self.enabled = enabled
        self.dir = Path(log_dir)
        self._file = None
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.dir / "metrics.jsonl", "a")  # noqa: SIM115 - closed in close()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.dir / "tensorboard"))
        if wandb_project:
            try:
                import wandb
            except ImportError as err:
                raise ValueError("log.wandb_project is set but the wandb package is not installed") from err
            self._wandb = wandb.init(project=wandb_project, config=config, dir=str(self.dir))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        assert self._file is not None
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        step = record["step"]
        scalars = {k: v for k, v in record.items() if isinstance(v, int | float) and k != "step"}
        if self._tb is not None:
            for key, value in scalars.items():
                if math.isfinite(value):
                    self._tb.add_scalar(key, value, step)
            for layer, imb in enumerate(record.get("expert_imbalance", [])):
                self._tb.add_scalar(f"expert_imbalance/layer{layer}", imb, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def console_line(r: dict[str, Any], total_iters: int) -> str:
    parts = [f"step {r['step']}/{total_iters}", f"loss {r['loss']:.4f}", f"lm {r['lm_loss']:.4f}"]
    if r.get("aux_loss") is not None:
        parts.append(f"aux {r['aux_loss']:.4f}")
    if r.get("z_loss") is not None:
        parts.append(f"z {r['z_loss']:.4f}")
    parts += [
        f"lr {r['lr']:.3e}",
        f"gnorm {r['grad_norm']:.3f}" if r.get("grad_norm") is not None else "gnorm -",
        f"{r['tokens_per_s']:.0f} tok/s",
        f"{r['tflops_per_device']:.2f} TFLOP/s/dev",
    ]
    if r.get("mfu") is not None:
        parts.append(f"MFU {100 * r['mfu']:.1f}%")
    if r.get("expert_imbalance"):
        parts.append(f"imbalance max {max(r['expert_imbalance']):.2f}")
    if r.get("skipped"):
        parts.append("SKIPPED (non-finite loss)")
    return " | ".join(parts)
