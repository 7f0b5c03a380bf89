"""`moe-recipes plot`: valid, non-trivial PNGs from a metrics file."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pytest

from moe_recipes.cli import main
from moe_recipes.train.plot import plot_run, read_metrics


def _png_pixels(path: Path) -> tuple[int, int, bytes]:
    """(width, height, decompressed scanlines) of a PNG, checking its signature and chunk CRCs."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    pos, idat, width, height = 8, b"", 0, 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"{path}: bad CRC in {kind!r}"
        if kind == b"IHDR":
            width, height = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    return width, height, zlib.decompress(idat)


def _write_metrics(run: Path, steps: int = 6, experts: int = 4) -> None:
    run.mkdir(parents=True)
    lines = []
    for step in range(1, steps + 1):
        share = [[(i + step) % experts / 6 for i in range(experts)] for _ in range(2)]
        loss = 10.0 - step
        lines.append({"step": step, "loss": loss + 0.01, "lm_loss": loss, "aux_loss": 1.0 + 0.1 / step,
                      "z_loss": 2.0, "global_aux_loss": None, "expert_share": share})  # fmt: skip
        if step % 3 == 0:
            lines.append({"step": step, "valid_loss": loss + 0.5, "valid_ppl": 1.0})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_plot_writes_loss_and_per_layer_heatmaps(tmp_path, capsys):
    run = tmp_path / "run"
    _write_metrics(run)
    assert main(["plot", str(run)]) == 0
    printed = capsys.readouterr().out.split()
    expected = [run / "plots" / "loss.png"] + [
        run / "plots" / f"expert_load_layer{i:02d}.png" for i in (0, 1)
    ]
    assert printed == [str(p) for p in expected]
    for path in expected:
        width, height, pixels = _png_pixels(path)
        assert width >= 400 and height >= 150
        # many distinct byte values: lines, text and colours were drawn, not a blank canvas
        assert len(set(pixels)) > 50, path
    # the heatmap's colours change with the shares: two runs with different loads give different images
    other = tmp_path / "other"
    _write_metrics(other, experts=4)
    records = (other / "metrics.jsonl").read_text().replace("0.5", "0.05")
    (other / "metrics.jsonl").write_text(records)
    paths = plot_run(other)
    assert _png_pixels(paths[1])[2] != _png_pixels(expected[1])[2]


def test_read_metrics_keeps_the_last_record_of_a_step_and_names_bad_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        '{"step": 1, "lm_loss": 3.0}\n{"step": 1, "lm_loss": 2.0}\n{"step": 1, "valid_loss": 2.5}\n'
    )
    train, valid = read_metrics(path)
    assert [r["lm_loss"] for r in train] == [2.0] and [r["valid_loss"] for r in valid] == [2.5]
    path.write_text('{"step": 1, "lm_loss": 3.0}\nnot json\n')
    with pytest.raises(ValueError, match="line 2"):
        read_metrics(path)
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plot_run(tmp_path / "missing")
