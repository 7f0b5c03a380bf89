"""`moe-recipes plot RUN_DIR`: PNG figures from a run's `metrics.jsonl`.

* ``loss.png``: training LM loss and total loss, validation loss (markers), and on a second panel the
  router losses that were logged (micro-batch, global-batch and per-sequence balance losses, z-loss);
* ``expert_load_layerNN.png``: per MoE layer, a heatmap of the share of routing slots each expert received
  at every logged step (experts x steps; 1/E everywhere is perfect balance).

Uses matplotlib's non-interactive Agg backend, so it runs on machines without a display. A resumed run
appends to the same metrics file; the last record of each step wins.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

_ROUTER_KEYS = ("aux_loss", "global_aux_loss", "seq_aux_loss", "z_loss")


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training records, validation records) of a metrics file, each sorted by step, one per step."""
    if not path.is_file():
        raise FileNotFoundError(f"plot: no metrics file {path}")
    train: dict[int, dict[str, Any]] = {}
    valid: dict[int, dict[str, Any]] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"plot: {path} line {n} is not JSON ({err.msg})") from err
        if "lm_loss" in record:
            train[int(record["step"])] = record
        elif "valid_loss" in record:
            valid[int(record["step"])] = record
    return [train[s] for s in sorted(train)], [valid[s] for s in sorted(valid)]


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [s for s, _ in pairs], [v for _, v in pairs]


def plot_losses(train: list[dict[str, Any]], valid: list[dict[str, Any]], out: Path) -> Path:
    """Write the loss figure: LM/total/validation loss on top, router losses below (when logged)."""
    import matplotlib.pyplot as plt

    router = [k for k in _ROUTER_KEYS if _series(train, k)[0]]
    fig, axes = plt.subplots(
        2 if router else 1, 1, figsize=(8, 7 if router else 4), sharex=True, squeeze=False
    )
    top = axes[0][0]
    for key, label in (("loss", "train loss (total)"), ("lm_loss", "train LM loss")):
        top.plot(*_series(train, key), label=label)
    if valid:
        top.plot(*_series(valid, "valid_loss"), "o-", label="valid loss")
    top.set_ylabel("loss")
    top.legend()
    top.grid(alpha=0.3)
    if router:
        bottom = axes[1][0]
        for key in router:
            bottom.plot(*_series(train, key), label=key)
        bottom.set_ylabel("router losses")
        bottom.legend()
        bottom.grid(alpha=0.3)
    axes[-1][0].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_expert_load(train: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Write one heatmap per MoE layer from the records' ``expert_share`` (layers x experts per step)."""
    import matplotlib.pyplot as plt
    import numpy as np

    records = [r for r in train if r.get("expert_share")]
    if not records:
        return []
    steps = [r["step"] for r in records]
    shares = np.asarray([r["expert_share"] for r in records], dtype=np.float64)  # (steps, layers, E)
    paths = []
    for layer in range(shares.shape[1]):
        grid = shares[:, layer, :].T  # (E, steps)
        fig, ax = plt.subplots(figsize=(8, 1.5 + 0.3 * grid.shape[0]))
        image = ax.imshow(
            grid, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest",
            extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, grid.shape[0] - 0.5),
        )  # fmt: skip
        ax.set_xlabel("step")
        ax.set_ylabel("expert")
        ax.set_title(f"MoE layer {layer}: share of routing slots (even = {1 / grid.shape[0]:.3f})")
        fig.colorbar(image, ax=ax, label="share")
        fig.tight_layout()
        path = out_dir / f"expert_load_layer{layer:02d}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_run(run_dir: str | Path, output_dir: str | Path | None = None) -> list[Path]:
    """Write every figure of a run directory; returns the PNG paths (loss figure first)."""
    import matplotlib

    matplotlib.use("Agg")
    run = Path(run_dir)
    out = Path(output_dir) if output_dir is not None else run / "plots"
    train, valid = read_metrics(run / "metrics.jsonl")
    if not train:
        raise ValueError(f"plot: {run / 'metrics.jsonl'} has no training records")
    out.mkdir(parents=True, exist_ok=True)
    return [plot_losses(train, valid, out / "loss.png"), *plot_expert_load(train, out)]


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register `moe-recipes plot`."""
    p = sub.add_parser("plot", help="PNG figures (losses, expert load per layer) from a run's metrics.jsonl")
    p.add_argument("run_dir", help="the run directory (log.dir) holding metrics.jsonl")
    p.add_argument("--output", default=None, help="where to write the PNGs (default: RUN_DIR/plots)")
    p.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    for path in plot_run(args.run_dir, args.output):
        print(path)
    return 0
