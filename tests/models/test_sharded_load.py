"""Sharded start-up (models/sharded_load.py): built on meta, sharded, filled with only this rank's rows.

The reference is `load_model` (``from_pretrained`` of the whole model). After the sharded load the full
parameters and buffers (gathered from every rank) must equal it bit for bit, for every family, from bf16 and
fp32 files, on 1, 2 and 4 processes, with and without expert parallelism; and each rank must read only
about its share of the checkpoint's bytes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moe_recipes.models.loading import load_model
from moe_recipes.models.sharded_load import build_on_meta, fill_from_folder
from tests.harness import run_distributed

from ..test_hf_layout import CONFIGS, _tiny


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], where: str) -> None:
    assert got.keys() == want.keys(), f"{where}: {sorted(got.keys() ^ want.keys())[:4]}"
    for name, value in want.items():
        assert got[name].dtype == value.dtype, (where, name)
        assert torch.equal(got[name], value), (where, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", list(CONFIGS))
def test_one_process_equals_from_pretrained(tmp_path, arch, dtype):
    folder = tmp_path / "model"
    _tiny(arch, tmp_path, dtype).save_pretrained(str(folder))
    model = build_on_meta(str(folder))
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    report = fill_from_folder(model, folder)
    assert report.initialised == []
    _assert_same(_state(model), _state(load_model(str(folder))), f"{arch} {dtype}")


def _sharded_load(folders: list[str], ep: int) -> list[tuple[str, int, int]]:
    """On every rank: meta build, FSDP2 (and EP) sharding, fill; the gathered state must equal the full
    load. Returns (folder, bytes this rank read, bytes of the folder's tensors) per folder."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from moe_recipes.config import Config
    from moe_recipes.engines.fsdp2 import shard_and_fill
    from moe_recipes.models.inspect import inspect_model

    world = dist.get_world_size()
    out = []
    for folder in folders:
        model = build_on_meta(folder)
        cfg = Config()
        cfg.distributed.expert_parallel_size = ep
        shard_and_fill(model, model, cfg, inspect_model(model), torch.device("cpu"))
        model.to_empty(device="cpu")
        report = fill_from_folder(model, folder)
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        reference = load_model(folder)
        want = reference.state_dict()
        if dist.get_rank() == 0:
            _assert_same(dict(full), {k: want[k] for k in full}, f"{folder} on {world} ranks, EP {ep}")
        buffers = dict(model.named_buffers())  # non-persistent ones (rotary inv_freq) included
        for name, value in reference.named_buffers():
            assert torch.equal(buffers[name], value), (folder, name)
        total = sum(p.numel() * p.element_size() for p in _file_tensors(folder))
        out.append((folder, report.bytes_read, total))
    return out


def _file_tensors(folder: str) -> list[torch.Tensor]:
    from safetensors import safe_open

    tensors = []
    for path in Path(folder).glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            tensors += [f.get_tensor(k) for k in f.keys()]
    return tensors


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("world", "ep", "cases"),
    [
        (2, 1, [("mixtral", torch.bfloat16), ("deepseek_v3", torch.float32), ("qwen2", torch.float32)]),
        (2, 2, [("mixtral", torch.float32), ("qwen2_moe", torch.bfloat16)]),
        (4, 2, [("qwen3_moe", torch.bfloat16)]),
    ],
    ids=["2-ranks", "2-ranks-ep2", "4-ranks-ep2"],
)
def test_sharded_start_equals_from_pretrained(tmp_path, world, ep, cases):
    folders = []
    for arch, dtype in cases:
        folder = tmp_path / f"{arch}-{dtype}".replace("torch.", "")
        _tiny(arch, tmp_path / folder.name, dtype).save_pretrained(str(folder))
        folders.append(str(folder))
    results = run_distributed(_sharded_load, world, folders, ep, timeout=600)
    for per_rank in zip(*results, strict=True):
        total = per_rank[0][2]
        # every byte is read once over all ranks (no rank reads the whole checkpoint)...
        read = [r[1] for r in per_rank]
        assert max(read) < 0.75 * total, (per_rank[0][0], read, total)
        assert sum(read) >= total
