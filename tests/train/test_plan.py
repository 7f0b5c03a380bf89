"""The memory planner: parameter counts of real models, measured peaks on CPU, and the shipped recipes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moe_recipes.cli import main
from moe_recipes.config import load_config
from moe_recipes.models.inspect import count_parameters, inspect_model
from moe_recipes.train.plan import GIB, Hardware, meta_model, plan, plan_for_shape
from moe_recipes.train.plan_report import warn_if_over_memory

REPO = Path(__file__).resolve().parents[2]
CONFIGS = Path(__file__).parent / "plan_configs"

# Published totals and active parameters per token (model cards / papers). Mixtral and Qwen count the
# embedding table in "active"; DeepSeek-V2's 2.4B does not (2.45B here without it, 2.66B with it).
PUBLISHED = {
    "mixtral-8x7b": (46.7e9, 12.9e9, "active"),
    "qwen2-57b-a14b": (57.4e9, 14.0e9, "active"),
    "qwen3-30b-a3b": (30.5e9, 3.3e9, "active"),
    "deepseek-v2-lite": (15.7e9, 2.4e9, "active_non_embedding"),
}
ACTIVE_TOLERANCE = 0.03  # published active counts are rounded to 2-3 significant digits

# Each shipped recipe with the real model it is written for and the hardware its header states.
RECIPES = {
    "mixtral-8x7b.yaml": ("mixtral-8x7b", Hardware(8, 4, 80)),
    "mixtral-8x7b-instruct.yaml": ("mixtral-8x7b", Hardware(8, 4, 80)),
    "mixtral-8x7b-ep.yaml": ("mixtral-8x7b", Hardware(8, 4, 80)),
    "qwen2-57b-a14b.yaml": ("qwen2-57b-a14b", Hardware(8, 8, 80)),
    "deepseek-v2-lite.yaml": ("deepseek-v2-lite", Hardware(8, 1, 80)),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_match_published(name):
    total, active, kind = PUBLISHED[name]
    model = meta_model(CONFIGS / name)
    counts = count_parameters(model, inspect_model(model))
    assert counts["total"] == pytest.approx(total, rel=0.01)
    assert counts[kind] == pytest.approx(active, rel=ACTIVE_TOLERANCE)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_shipped_recipe_fits_its_stated_hardware(recipe):
    model, hardware = RECIPES[recipe]
    text = (REPO / "configs" / recipe).read_text()
    stated = f"{hardware.nodes} node{'s' if hardware.nodes > 1 else ''} x {hardware.gpus_per_node} H100 80GB"
    assert stated in text.split("\nmodel:")[0], f"{recipe} header should state {stated!r}"
    cfg = load_config(REPO / "configs" / recipe, [f"model.path={CONFIGS / model}"])
    p = plan(cfg, cfg.model.path, hardware)
    assert p.fits, f"{recipe}: {p.device_total / GIB:.1f} GiB > {p.usable_bytes / GIB:.1f} GiB usable"
    assert p.startup_fits, f"{recipe}: loading the model needs {p.startup.device_total / GIB:.1f} GiB per GPU"


def test_deepseek_v2_lite_cannot_train_replicated_on_one_node():
    cfg = load_config(
        REPO / "configs" / "deepseek-v2-lite.yaml",
        [f"model.path={CONFIGS / 'deepseek-v2-lite'}", "distributed.zero_stage=2"],
    )
    p = plan(cfg, cfg.model.path, Hardware(8, 1, 80))
    assert not p.fits and p.device["parameters (fp32, replicated)"] > 55 * GIB


def test_sharding_divides_the_model_state():
    cfg = load_config(REPO / "configs" / "qwen2-57b-a14b.yaml", [f"model.path={CONFIGS / 'qwen2-57b-a14b'}"])
    shape_args = (cfg, cfg.model.path)
    z3 = plan(*shape_args, Hardware(8, 8, 80))
    assert z3.device["AdamW moments (fp32 shard)"] == 8 * z3.model.total_params // 64
    cfg.distributed.engine, cfg.distributed.fsdp_shard_size = "fsdp2", 8
    hybrid = plan(*shape_args, Hardware(8, 8, 80))
    assert hybrid.shard_size == 8 and "hybrid" in hybrid.engine
    assert hybrid.device["AdamW moments (fp32 shard)"] == 8 * z3.model.total_params // 8
    cfg.distributed.fsdp_cpu_offload = True
    offload = plan(*shape_args, Hardware(8, 8, 80))
    assert "AdamW moments (fp32 shard)" in offload.host and offload.device_total < hybrid.device_total


def test_cli_json_and_table(capsys):
    recipe = str(REPO / "configs" / "deepseek-v2-lite.yaml")
    path = f"model.path={CONFIGS / 'deepseek-v2-lite'}"
    assert main(["plan", recipe, path, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] and out["hardware"]["gpus_per_node"] == 8
    assert "--gpus 8" in out["assumed"] and out["model"]["total_params"] > 15e9
    assert main(["plan", recipe, path, "--gpus", "2", "--gpu-memory", "40"]) == 0
    table = capsys.readouterr().out
    assert "DOES NOT FIT" in table and "assumed --nodes 1" in table and "headroom" in table


def test_warning_when_over_memory(tmp_path):
    cfg = load_config(
        REPO / "configs" / "deepseek-v2-lite.yaml", [f"model.path={CONFIGS / 'deepseek-v2-lite'}"]
    )
    note = warn_if_over_memory(cfg, cfg.model.path, 1, torch.device("cpu"))  # 15.7B params in this RAM
    assert note is not None and "memory plan needs" in note
    cfg.model.path = str(tmp_path / "missing")
    assert warn_if_over_memory(cfg, cfg.model.path, 1, torch.device("cpu")) is None


def test_expert_parallel_gathers_a_share_of_the_experts():
    """Mixtral-8x7B on 8 GPUs with FSDP2: the same 1/8 shards with or without EP, but EP=8 gathers one
    expert of a layer instead of all eight (the experts are 96% of a layer)."""
    overrides = [f"model.path={CONFIGS / 'mixtral-8x7b'}", "distributed.engine=fsdp2"]
    cfg = load_config(REPO / "configs" / "mixtral-8x7b.yaml", overrides)
    plain = plan(cfg, cfg.model.path, Hardware(8, 1, 80))
    cfg.distributed.expert_parallel_size = 8
    ep = plan(cfg, cfg.model.path, Hardware(8, 1, 80))
    assert "expert parallel 8" in ep.engine
    experts, layer = ep.model.largest_layer_expert_params, ep.model.largest_layer_params
    assert experts == 8 * 3 * 4096 * 14336 and experts / layer > 0.95
    for key in ("parameters (fp32 shard)", "AdamW moments (fp32 shard)"):
        assert ep.device[key] == plain.device[key]
    gathered = next(k for k in ep.device if k.startswith("gathered layers"))
    assert plain.device[gathered] - ep.device[gathered] == 2 * 2 * experts * 7 // 8  # bf16, 2 layers


def test_deepspeed_expert_parallel_replicates_a_share_of_the_experts():
    """ZeRO-2 + EP=8 on 8 GPUs: each rank replicates the dense parameters and 1/8 of the experts; the
    ZeRO shards of master weights, gradients and moments stay 1/W of the model."""
    overrides = [f"model.path={CONFIGS / 'mixtral-8x7b'}", "distributed.zero_stage=2"]
    cfg = load_config(REPO / "configs" / "mixtral-8x7b.yaml", overrides)
    plain = plan(cfg, cfg.model.path, Hardware(8, 1, 80))
    cfg.distributed.expert_parallel_size = 8
    ep = plan(cfg, cfg.model.path, Hardware(8, 1, 80))
    assert "ZeRO-2 + expert parallel 8" in ep.engine
    routed = ep.model.routed_expert_params
    assert routed == 32 * 8 * 3 * 4096 * 14336
    key = "parameters (fp32, replicated)"
    assert plain.device[key] - ep.device[key] == 4 * (routed * 7 // 8)
    for key in ("fp32 master copy (shard)", "gradients (fp32 shard)", "AdamW moments (fp32 shard)"):
        assert ep.device[key] == plain.device[key], key


def test_zero3_receives_layers_in_bf16_under_bf16():
    """ZeRO-3 with bf16 compute receives the matrices in bf16 (half the wire bytes) and widens them to fp32:
    the gathered layers still take 4 bytes/param, the receive buffer of the layer arriving 2 instead of 4."""
    cfg = load_config(REPO / "configs" / "qwen2-57b-a14b.yaml", [f"model.path={CONFIGS / 'qwen2-57b-a14b'}"])
    cfg.distributed.engine, cfg.distributed.zero_stage, cfg.train.precision = "deepspeed", 3, "bf16"
    bf16 = plan(cfg, cfg.model.path, Hardware(8, 8, 80))
    cfg.train.precision = "fp32"
    fp32 = plan(cfg, cfg.model.path, Hardware(8, 8, 80))
    layer = bf16.model.largest_layer_params
    assert bf16.device["gathered layers (fp32, 2 layers)"] == fp32.device["gathered layers (fp32, 2 layers)"]
    assert bf16.device["gather buffer (bf16, one layer)"] == 2 * layer
    assert fp32.device["gather buffer (fp32, one layer)"] == 4 * layer


def _mixtral(*overrides: str, nodes: int = 1):
    cfg = load_config(
        REPO / "configs" / "mixtral-8x7b.yaml", [f"model.path={CONFIGS / 'mixtral-8x7b'}", *overrides]
    )
    return plan(cfg, cfg.model.path, Hardware(8, nodes, 80))


def test_startup_of_each_engine_at_real_size():
    """Mixtral-8x7B (bf16 checkpoint) on 8 GPUs: FSDP2 starts sharded, each rank holding 1/8 of the fp32 model
    on its GPU and reading its 1/8 of the checkpoint with at most 64 MiB plus one read mapped at a time;
    DeepSpeed ZeRO 0-2 load the whole model on every rank (host: fp32 model + the mapped bf16 checkpoint; GPU:
    the fp32 model), and replicate it; ZeRO-3 starts partitioned (built on meta, each rank reading the rows of
    its partitions) as FSDP2 starts sharded."""
    fsdp = _mixtral("distributed.engine=fsdp2")
    m = fsdp.model
    p, ck, big = m.total_params, m.checkpoint_bytes, m.largest_tensor
    assert m.checkpoint_source.startswith("bfloat16") and ck == 2 * p
    assert big == 8 * 2 * 14336 * 4096  # one layer's fused gate_up_proj
    start = fsdp.startup
    assert start.mode == "sharded" and not start.replicates
    assert start.device_total == 4 * p // 8
    # on a host that is its own device (CPU): 1/8 of the fp32 model, and the mapped window and one read
    mapped = 64 * 2**20 + ck * big // 8 // p
    assert mapped < ck / 8 and start.on_cpu() == pytest.approx(4 * p / 8 + mapped, rel=1e-6)
    assert start.host_total < 0.01 * (4 * p)  # the GPU's shards are not on the host
    by_engine = {row.engine: row for row in [fsdp.startup, *fsdp.startup_by_engine]}
    assert sorted(by_engine) == [
        "DeepSpeed ZeRO-0",
        "DeepSpeed ZeRO-1",
        "DeepSpeed ZeRO-2",
        "DeepSpeed ZeRO-3",
        "FSDP2",
    ]
    for stage in (0, 1, 2):
        whole = by_engine[f"DeepSpeed ZeRO-{stage}"]
        assert whole.mode == "whole" and whole.replicates
        assert 4 * p + ck <= whole.host_total <= 1.02 * (4 * p + ck)  # the whole model per rank
        assert whole.device_total == 4 * p
        assert whole.host_per_node >= 8 * 4 * p + ck  # 8 private fp32 copies, the file pages once
        assert whole.host_total > 20 * start.host_total
    zero3 = by_engine["DeepSpeed ZeRO-3"]
    assert zero3.mode == "partitioned" and not zero3.replicates
    assert zero3.host_total == start.host_total and zero3.device_total == 4 * p // 8  # its partitions
    assert zero3.host_other_ranks is None  # every rank alike
    # the step plan of the configured engine agrees with its own table row
    assert _mixtral("distributed.zero_stage=2").startup.host_total == by_engine["DeepSpeed ZeRO-2"].host_total


def test_startup_that_does_not_fit_is_said():
    """ZeRO-2 + EP 8 on 4 nodes holds 1/8 of the experts in training and its step fits; it starts on meta and
    each GPU receives only the dense part and its experts, so its start-up fits too. From a folder without
    safetensors it loads the whole model first: the whole fp32 model reaches each GPU before the experts are
    cut, and the plan says that start-up does not fit. FSDP2 + EP 8 starts sharded."""
    ds = _mixtral("distributed.zero_stage=2", "distributed.expert_parallel_size=8", nodes=4)
    m = ds.model
    own = m.total_params - m.routed_expert_params + m.routed_expert_params // 8
    assert ds.startup.mode == "experts" and ds.startup.device_total == 4 * own
    assert ds.fits and ds.startup_fits
    assert "replicated: dense parameters and 1/8" in ds.startup.in_training
    cfg = load_config(
        REPO / "configs" / "mixtral-8x7b.yaml",
        [
            f"model.path={CONFIGS / 'mixtral-8x7b'}",
            "distributed.zero_stage=2",
            "distributed.expert_parallel_size=8",
        ],
    )
    whole = plan_for_shape(cfg, m, Hardware(8, 4, 80), safetensors=False)
    assert whole.startup.mode == "whole" and whole.startup.device_total == 4 * m.total_params
    assert whole.startup.device_total > whole.device["parameters (fp32, replicated)"]
    assert whole.fits and not whole.startup_fits
    fsdp = _mixtral("distributed.engine=fsdp2", "distributed.expert_parallel_size=8", nodes=4)
    assert fsdp.startup_fits and fsdp.startup.mode == "sharded"


def test_startup_mode_follows_the_folder_and_offload(tmp_path):
    """FSDP2 starts sharded only from safetensors and without CPU offload (from .bin weights: rank 0 reads
    and sends rows); the checkpoint's size is read from its files when they are there."""
    assert _mixtral("distributed.engine=fsdp2", "distributed.fsdp_cpu_offload=true").startup.mode == "whole"
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text((CONFIGS / "mixtral-8x7b" / "config.json").read_text())
    cfg = load_config(
        REPO / "configs" / "mixtral-8x7b.yaml", [f"model.path={folder}", "distributed.engine=fsdp2"]
    )
    assert plan(cfg, folder, Hardware(8, 1, 80)).startup.mode == "sharded"  # weights not there yet
    (folder / "pytorch_model.bin").write_bytes(b"0" * 1000)
    scatter = plan(
        cfg, folder, Hardware(8, 1, 80)
    )  # rank 0 reads the .bin files and sends each rank its rows
    start, m = scatter.startup, scatter.model
    assert start.mode == "rank0_scatter" and not start.replicates
    assert start.device_total == 4 * m.total_params // 8 + 4 * m.largest_tensor  # shards + the tensor sent
    assert start.host_total == m.checkpoint_bytes + 4 * m.largest_tensor  # one mapped file + one tensor
    assert start.host_other_ranks == 0  # the others receive into their shards
    (folder / "model.safetensors").write_bytes(b"0" * 12345)
    p = plan(cfg, folder, Hardware(8, 1, 80))
    assert p.startup.mode == "sharded"
    assert p.model.checkpoint_bytes == 12345 and "safetensors" in p.model.checkpoint_source


def test_cli_prints_the_startup_of_every_engine(capsys):
    recipe = str(REPO / "configs" / "mixtral-8x7b.yaml")
    path = f"model.path={CONFIGS / 'mixtral-8x7b'}"
    assert main(["plan", recipe, path, "distributed.engine=fsdp2", "--gpus", "8"]) == 0
    table = capsys.readouterr().out
    assert "start-up (loading the model, before the first step), per rank:" in table
    rows = table.split("start-up peak per rank, by engine")[1].splitlines()[2:7]
    assert rows[0].startswith("* FSDP2 ") and "sharded 1/8" in rows[0]
    assert sum("replicated: the whole model on every rank" in r for r in rows) == 3  # ZeRO 0, 1 and 2
    assert main(["plan", recipe, path, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["startup"]["mode"] == "partitioned" and out["startup"]["replicates"] is False
    assert len(out["startup_by_engine"]) == 4 and out["startup_fits"] is True
    assert all(row["host_total"] > 0 and row["device_total"] > 0 for row in out["startup_by_engine"])
