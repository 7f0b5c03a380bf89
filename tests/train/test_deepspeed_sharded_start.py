"""DeepSpeed starts from the files without a whole model per rank.

ZeRO-3 builds the model on ``meta``, makes every parameter a ZeRO-3 parameter holding only this rank's flat
partition (`engine.partition_on_meta`) and reads only the file rows that cover it; with expert parallelism
(ZeRO 0-2) each rank materialises and reads only its experts (and the replicated rest). The reference is
`load_model` (``from_pretrained`` of the whole model): the gathered parameters and the buffers must equal it
bit for bit, and each rank must read only about its share of the bytes. A ZeRO-3 run started this way gives
the losses of the whole-model start (which a folder without safetensors still takes, saying so).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from moe_recipes.config import load_config
from moe_recipes.models.loading import load_model
from moe_recipes.train.plan_startup import (
    EXPERTS,
    PARTITIONED,
    RANK0_READS,
    WHOLE,
    StartMode,
    start_mode,
    training_start,
)
from tests.harness import DIRECT, run_cli_distributed, run_distributed

from ..test_hf_layout import _tiny
from .utils import step_records, write_config

CASES = [("mixtral", torch.float32), ("deepseek_v3", torch.bfloat16), ("qwen2_moe", torch.bfloat16)]


def _reference(folder: str) -> dict[str, torch.Tensor]:
    ref = load_model(folder)
    return {**dict(ref.named_parameters()), **dict(ref.named_buffers())}


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], where: str) -> None:
    assert got.keys() == want.keys(), (where, sorted(got.keys() ^ want.keys())[:4])
    for name, value in want.items():
        assert got[name].dtype == value.dtype and got[name].shape == value.shape, (where, name)
        assert torch.equal(got[name], value), (where, name)


def _zero3_config(world: int) -> dict:
    from moe_recipes.config import Config
    from moe_recipes.engines.deepspeed_zero import deepspeed_config

    cfg = Config()
    cfg.distributed.zero_stage = 3
    cfg.train.micro_batch_size, cfg.train.global_batch_size = 1, world
    return deepspeed_config(cfg, world)


def _partitioned(folder: str, missing: tuple[str, ...] = ()) -> tuple[int, bool]:
    """ZeRO-3 partitioned start of `folder` on this rank, checked against the whole load; the `missing`
    tensors (absent from the folder) must be initialised as the model initialises them. Returns (bytes read,
    whether some partition starts inside a row)."""
    import deepspeed
    import torch.distributed as dist

    from moe_recipes.engines.deepspeed_zero import partition_and_fill
    from moe_recipes.models.sharded_load import build_on_meta

    model = build_on_meta(folder)
    report = partition_and_fill(model, _zero3_config(dist.get_world_size()), folder)
    assert report.initialised == list(missing)
    params = list(model.parameters())
    assert all(p.numel() == 0 and p.ds_tensor.numel() == p.ds_tensor.ds_numel for p in params)
    rows = [math.prod(p.ds_shape[1:]) for p in params]
    mid_row = any(p.ds_tensor.ds_numel * dist.get_rank() % r for p, r in zip(params, rows, strict=True))
    with deepspeed.zero.GatheredParameters(params):
        got = {n: p.detach().clone() for n, p in model.named_parameters()}
    want = _reference(folder)
    for name in missing:  # random in both: rank 0's draw of the model's own init, not an empty partition
        std = model.config.initializer_range
        assert got[name].isfinite().all() and 0.8 * std < got[name].std() < 1.2 * std, name
        got.pop(name), want.pop(name)
    _assert_same({**got, **dict(model.named_buffers())}, want, f"{folder} ZeRO-3")
    return report.bytes_read, mid_row


def _experts(folder: str) -> int:
    """DeepSpeed EP=2 start of `folder` (meta, experts cut, only this rank's rows read), checked against the
    rows of the whole load; returns the bytes read."""
    import torch.distributed as dist

    from moe_recipes.distributed.expert_parallel import EP_FIRST_EXPERT, EPLayout, shard_experts
    from moe_recipes.engines.deepspeed_ep import create_groups
    from moe_recipes.models.inspect import inspect_model
    from moe_recipes.models.sharded_load import build_on_meta, materialise_and_fill

    model = build_on_meta(folder)
    info = inspect_model(model)
    layout = EPLayout(2, dist.get_rank() % 2, info.num_experts)
    shard_experts(info, layout, create_groups(2))
    report = materialise_and_fill(model, model, folder, torch.device("cpu"))
    want = _reference(folder)
    got = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    cut = {n for n, p in model.named_parameters() if hasattr(p, EP_FIRST_EXPERT)}
    assert cut and all(getattr(model.get_parameter(n), EP_FIRST_EXPERT) == layout.first_expert for n in cut)
    for name in cut:
        want[name] = want[name][layout.first_expert : layout.first_expert + layout.local_experts]
    _assert_same({k: v.detach() for k, v in got.items()}, want, f"{folder} EP 2")
    return report.bytes_read


def _load_on_ranks(folders: list[str], lacking: str | None = None) -> list[tuple]:
    """Per folder: (bytes read by the ZeRO-3 start, whether a partition starts inside a row, bytes read by the
    EP start on 2 ranks). `lacking`: a folder without ``lm_head.weight``, started partitioned too."""
    import deepspeed
    import torch.distributed as dist

    from moe_recipes.distributed.env import _skip_deepspeed_shm_op

    _skip_deepspeed_shm_op()  # as the trainer does: no JIT build (a minute on 2 cores) of an op it never uses
    deepspeed.init_distributed(dist_backend="gloo")
    out = []
    for folder in folders:
        read, mid_row = _partitioned(folder)
        out.append((read, mid_row, _experts(folder) if dist.get_world_size() == 2 else None))
    if lacking is not None:
        _partitioned(lacking, missing=("lm_head.weight",))
    return out


def _file_bytes(folder: str) -> int:
    total = 0
    for path in Path(folder).glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                tensor = f.get_tensor(key)
                total += tensor.numel() * tensor.element_size()
    return total


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("released")
    out = []
    for arch, dtype in CASES:
        folder = root / f"{arch}-{str(dtype).removeprefix('torch.')}"
        _tiny(arch, root / f"{folder.name}-tmp", dtype).save_pretrained(str(folder))
        out.append(str(folder))
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("world", [1, 2])
def test_partitioned_and_expert_starts_equal_from_pretrained(folders, world, tmp_path):
    folders = folders if world == 2 else folders[1:2]  # one process: one partition, the whole tensor
    lacking = _without(folders[0], "lm_head.weight", tmp_path / "lacking") if world == 2 else None
    results = run_distributed(_load_on_ranks, world, folders, lacking, timeout=600)
    for i, folder in enumerate(folders):
        total = _file_bytes(folder)
        zero3 = [r[i][0] for r in results]
        assert sum(zero3) >= total, (folder, zero3, total)  # every byte is read...
        if world == 1:
            continue
        assert max(zero3) < 0.6 * total, (folder, zero3, total)  # ...and no rank reads the whole checkpoint
        experts = [r[i][2] for r in results]
        assert sum(experts) >= total and max(experts) < 0.9 * total, (folder, experts, total)
    if world == 2:  # the one-row buffer at a partition's ends was used
        assert any(r[i][1] for r in results for i in range(len(folders)))


def _without(src: str, name: str, dst: Path) -> str:
    """A copy of the single-file model folder `src` without the tensor `name`."""
    dst.mkdir()
    for path in Path(src).iterdir():
        if path.suffix != ".safetensors":
            (dst / path.name).write_bytes(path.read_bytes())
    tensors = load_file(str(Path(src) / "model.safetensors"))
    del tensors[name]
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return str(dst)


def _without_safetensors(src: str, dst: Path) -> str:
    """A copy of the model folder `src` whose weights are a pytorch_model.bin (same tensors and names)."""
    dst.mkdir()
    for path in Path(src).iterdir():
        if path.suffix == ".safetensors":
            continue
        (dst / path.name).write_bytes(path.read_bytes())
    tensors = {}
    for path in Path(src).glob("*.safetensors"):
        tensors |= load_file(str(path))
    torch.save(tensors, dst / "pytorch_model.bin")
    (dst / "model.safetensors.index.json").unlink(missing_ok=True)
    return str(dst)


def test_start_mode_falls_back_to_the_whole_load_with_its_reason(tmp_path, tiny_mixtral, capsys):
    bin_folder = _without_safetensors(tiny_mixtral, tmp_path / "bin")

    def config(path: str, *extra: str):  # noqa: ANN202
        return load_config(
            None, [f"model.path={path}", "data.path=unused", "distributed.engine=deepspeed", *extra]
        )

    def mode(path: str, *extra: str, ds: dict | None = None) -> StartMode:
        return training_start(config(path, *extra), ds if ds is not None else _zero3_config(1))

    assert mode(tiny_mixtral, "distributed.zero_stage=3") is PARTITIONED
    assert mode(tiny_mixtral, "distributed.zero_stage=2") is WHOLE  # replicated by design, no message
    assert mode(tiny_mixtral, "distributed.zero_stage=2", "distributed.expert_parallel_size=2") is EXPERTS
    assert capsys.readouterr().out == ""
    assert mode(bin_folder, "distributed.zero_stage=3") is RANK0_READS  # from_pretrained under zero.Init
    assert f"whole model on every rank before partitioning ({bin_folder} holds no safetensors" in (
        capsys.readouterr().out
    )
    assert mode(bin_folder, "distributed.zero_stage=2", "distributed.expert_parallel_size=2") is WHOLE
    assert "before cutting the experts" in capsys.readouterr().out
    bf16 = {**_zero3_config(1), "bf16": {"enabled": True}}
    assert mode(tiny_mixtral, "distributed.zero_stage=3", ds=bf16) is RANK0_READS
    assert "enables bf16: its parameters are not fp32" in capsys.readouterr().out
    # plan asks without a DeepSpeed JSON at hand: the keys come from distributed.deepspeed_config
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"offload_param": {"device": "nvme"}}}))
    cfg = config(tiny_mixtral, "distributed.zero_stage=3", f"distributed.deepspeed_config={user}")
    assert (
        start_mode(cfg) is RANK0_READS
        and start_mode(config(tiny_mixtral, "distributed.zero_stage=3")) is PARTITIONED
    )


@pytest.mark.distributed
def test_zero3_partitioned_start_trains_like_the_whole_load(tmp_path, tiny_mixtral, tiny_dataset):
    short = (
        "train.micro_batch_size=2",
        "train.global_batch_size=4",
        "train.iters=2",
        "eval.iters=0",
        "distributed.zero_stage=3",
    )
    runs = {}
    for name, model in (
        ("meta", tiny_mixtral),
        ("whole", _without_safetensors(tiny_mixtral, tmp_path / "bin")),
    ):
        (tmp_path / name).mkdir()
        config = write_config(tmp_path / name, model, tiny_dataset, *short)
        out = run_cli_distributed(["train", str(config)], world_size=2, launcher=DIRECT, timeout=600)
        runs[name] = (out.stdout, step_records(tmp_path / name / "run"))
    assert "(built on meta, partitioned by ZeRO-3, each rank read only its partition)" in runs["meta"][0]
    assert "(whole model loaded on every rank, then partitioned)" in runs["whole"][0]
    assert "holds no safetensors weights" in runs["whole"][0]
    meta, whole = runs["meta"][1], runs["whole"][1]
    assert sorted(meta) == sorted(whole) == [1, 2]
    for step in meta:
        for key in ("lm_loss", "aux_loss", "z_loss", "grad_norm"):
            assert meta[step][key] == whole[step][key], (step, key, json.dumps([meta[step], whole[step]]))
