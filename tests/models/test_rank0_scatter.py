"""FSDP2's start from ``.bin`` weights (models/scatter_load.py): built on meta, sharded, rank 0 reads and sends rows.

The reference is `load_model` (``from_pretrained`` of the whole model). After the start the full parameters
and buffers (gathered from every rank) must equal it bit for bit, with and without expert parallelism, from a
sharded ``.bin`` folder (in-memory tensors whose file tensors lie in two files) and from one
``pytorch_model.bin``; the trainer's choice must be the scatter start; and no rank but 0 may open a file.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moe_recipes.config import Config
from moe_recipes.models.loading import load_model
from moe_recipes.train.plan_startup import RANK0_SCATTER, WHOLE, start_mode
from tests.harness import DIRECT, run_distributed

from ..test_hf_layout import _tiny
from .test_sharded_load import _assert_same


def _bin_folder(arch: str, tmp_path: Path, dtype: torch.dtype, max_shard_size: str | None) -> str:
    """A tiny model saved as torch .bin files in the released layout: what save_pretrained wrote with
    ``safe_serialization=False`` (transformers 5 writes safetensors only, so its files are re-saved)."""
    from safetensors.torch import load_file

    folder = tmp_path / f"{arch}-bin"
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    _tiny(arch, tmp_path / arch, dtype).save_pretrained(str(folder), **kwargs)
    renamed = {}
    for path in sorted(folder.glob("*.safetensors")):
        name = path.name.replace("model", "pytorch_model", 1).replace(".safetensors", ".bin")
        torch.save(load_file(path), folder / name)
        renamed[path.name] = name
        path.unlink()
    index = folder / "model.safetensors.index.json"
    if len(renamed) > 1:
        data = json.loads(index.read_text())
        data["weight_map"] = {k: renamed[v] for k, v in data["weight_map"].items()}
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps(data))
    else:
        (folder / next(iter(renamed.values()))).rename(folder / "pytorch_model.bin")
    index.unlink(missing_ok=True)
    assert not list(folder.glob("*.safetensors"))
    return str(folder)


def _no_file_reads(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
    raise AssertionError("a rank other than 0 opened a weight file")


def _scatter_start(folders: list[str], ep: int) -> list[tuple[str, str]]:
    """On every rank: the trainer's choice of start, meta build, FSDP2 (and EP) cut and fill; rank 1 may not call
    torch.load meanwhile. Then the gathered state must equal the full load. Returns (folder, start mode key)
    per folder."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from moe_recipes.engines.fsdp2 import shard_and_fill
    from moe_recipes.models.inspect import inspect_model
    from moe_recipes.models.sharded_load import build_on_meta
    from moe_recipes.train.plan_startup import training_start

    rank, world = dist.get_rank(), dist.get_world_size()
    out = []
    for folder in folders:
        cfg = Config()
        cfg.model.path = folder
        cfg.distributed.engine, cfg.distributed.expert_parallel_size = "fsdp2", ep
        mode = training_start(cfg)
        model = build_on_meta(folder)
        real_load = torch.load
        if rank != 0:
            torch.load = _no_file_reads
        try:
            shard_and_fill(model, model, cfg, inspect_model(model), torch.device("cpu"), weights=folder)
        finally:
            torch.load = real_load
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        reference = load_model(folder)
        want = reference.state_dict()
        if rank == 0:
            _assert_same(dict(full), {k: want[k] for k in full}, f"{folder} on {world} ranks, EP {ep}")
            assert full.keys() == want.keys()
        buffers = dict(model.named_buffers())  # non-persistent ones (rotary inv_freq) included
        for name, value in reference.named_buffers():
            assert torch.equal(buffers[name], value), (folder, name)
        out.append((folder, mode.key))
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("ep", [1, 2], ids=["fsdp2", "fsdp2-ep2"])
def test_scatter_start_equals_from_pretrained(tmp_path, ep):
    folders = [
        _bin_folder("mixtral", tmp_path, torch.bfloat16, "30KB"),  # several .bin shards and an index
        _bin_folder("qwen3_moe", tmp_path, torch.float32, None),  # one pytorch_model.bin
    ]
    index = json.loads(Path(folders[0], "pytorch_model.bin.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 1
    results = run_distributed(_scatter_start, 2, folders, ep, timeout=300)
    for per_rank in zip(*results, strict=True):
        assert {r[1] for r in per_rank} == {RANK0_SCATTER.key}, per_rank


def test_start_mode_picks_the_scatter_for_fsdp2_only():
    cfg = Config()
    cfg.distributed.engine = "fsdp2"
    assert start_mode(cfg, safetensors=True) is not RANK0_SCATTER
    assert start_mode(cfg, safetensors=False) is RANK0_SCATTER
    cfg.distributed.expert_parallel_size = 2
    assert start_mode(cfg, safetensors=False) is RANK0_SCATTER
    cfg.distributed.fsdp_cpu_offload = True
    assert start_mode(cfg, safetensors=False) is WHOLE
    cfg = Config()
    cfg.distributed.engine, cfg.distributed.expert_parallel_size = "deepspeed", 2
    assert start_mode(cfg, safetensors=False) is WHOLE  # DeepSpeed EP keeps the whole load


@pytest.mark.distributed
def test_fsdp2_training_starts_from_bin_weights_by_rank0_scatter(tmp_path, tiny_mixtral, tiny_dataset):
    """`train` on 2 processes, FSDP2 + EP 2, from a pytorch_model.bin: the scatter start, said as such."""
    from tests.harness import run_cli_distributed
    from tests.train.test_deepspeed_sharded_start import _without_safetensors
    from tests.train.utils import write_config

    model = _without_safetensors(tiny_mixtral, tmp_path / "bin")
    (tmp_path / "run").mkdir()
    config = write_config(
        tmp_path / "run",
        model,
        tiny_dataset,
        "distributed.engine=fsdp2",
        "distributed.expert_parallel_size=2",
        "train.iters=1",
        "eval.iters=0",
        "train.micro_batch_size=2",
        "train.global_batch_size=4",
    )
    out = run_cli_distributed(["train", str(config)], world_size=2, launcher=DIRECT, timeout=400).stdout
    assert "holds no safetensors weights: built on meta and sharded, rank 0 reads the .bin weights" in out
    assert f"({RANK0_SCATTER.said})" in out
    assert "whole model" not in out
