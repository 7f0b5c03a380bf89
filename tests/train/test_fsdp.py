"""The FSDP2 engine: config keys, its options, parity with DeepSpeed, resharding resume and conversion."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM

from moe_recipes.convert.hf import convert_checkpoint
from moe_recipes.engines.fsdp2 import build_mesh
from moe_recipes.train import trainer
from moe_recipes.train.signals import StopRequest
from tests.harness import DIRECT, run_cli_distributed

from ..convert.utils import assert_released_layout, expected_keys, logits_of, probe_ids, weight_map
from .utils import TWO_PROCESS_COMMON, make_config, step_records, write_config

FSDP = "distributed.engine=fsdp2"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["distributed.engine=megatron"], "distributed.engine"),
        ([FSDP, "distributed.fsdp_shard_size=0"], "distributed.fsdp_shard_size"),
        ([FSDP, "distributed.offload_optimizer=true"], "distributed.offload_optimizer"),
        ([FSDP, "distributed.zero_stage=3", "distributed.offload_params=true"], "distributed.offload_params"),
        (["distributed.fsdp_cpu_offload=true"], "distributed.fsdp_cpu_offload"),
        (["distributed.fsdp_shard_size=2"], "distributed.fsdp_shard_size"),
        (["distributed.fsdp_reshard_after_forward=false"], "distributed.fsdp_reshard_after_forward"),
        (["distributed.fsdp_defer_grad_sync=true"], "distributed.fsdp_defer_grad_sync"),
    ],
)
def test_config_checks_name_the_key(tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        make_config(tmp_path, "model", "data", *extra)


def test_hybrid_shard_size_must_divide_the_world():
    with pytest.raises(ValueError, match="fsdp_shard_size=2 does not divide the 3 processes"):
        build_mesh("cpu", 3, 2)


def _run(cfg) -> trainer.Run:
    run = trainer.setup(cfg)
    try:
        assert trainer._loop(run, StopRequest()) == 0
    finally:
        run.writer.close()
    return run


def _records(d: Path) -> list[tuple[float, float, float]]:
    return [(r["lm_loss"], r["aux_loss"], r["grad_norm"]) for r in step_records(d / "run").values()]


def _layer_sharded_after_forward(objective) -> bool:
    ids = torch.ones(1, 8, dtype=torch.long)
    with torch.no_grad():
        objective(input_ids=ids, labels=ids)
    return isinstance(objective.model.model.layers[0].self_attn.q_proj.weight, DTensor)


def test_options_keep_the_deepspeed_losses(tmp_path, tiny_mixtral, tiny_dataset):
    """One process: FSDP2 with CPU offload, no resharding and activation checkpointing == ZeRO-0."""
    common = ("train.iters=3", "eval.iters=0")
    ds = make_config(tmp_path / "ds", tiny_mixtral, tiny_dataset, *common)
    assert trainer.train(ds) == 0
    opts = (
        FSDP,
        "distributed.fsdp_cpu_offload=true",
        "distributed.fsdp_reshard_after_forward=false",
        "train.activation_checkpointing=true",
    )
    run = _run(make_config(tmp_path / "fsdp", tiny_mixtral, tiny_dataset, *common, *opts))
    a, b = _records(tmp_path / "ds"), _records(tmp_path / "fsdp")
    assert len(a) == len(b) == 3
    assert [v for r in b for v in r] == pytest.approx([v for r in a for v in r], rel=1e-5)
    objective = run.engine.module
    layer = objective.model.model.layers[0]
    # Not resharded after forward: the decoder layer's weights are still gathered (plain tensors).
    assert not _layer_sharded_after_forward(objective)
    assert type(layer._get_fsdp_state()._mp_policy).__name__ == "MixedPrecisionPolicy"
    offload = layer._get_fsdp_state()._fsdp_param_group.offload_policy
    assert type(offload).__name__ == "CPUOffloadPolicy"
    del run
    gc.collect()


def test_bf16_uses_bf16_params_with_fp32_reduction(tmp_path, tiny_mixtral, tiny_dataset):
    """train.precision=bf16: compute in bf16, fp32 shards and fp32 reduction; losses near DeepSpeed's."""
    # one micro-batch of 2 x 32 tokens per step: bf16 is emulated (40-60x slower) on CPUs without bf16 units
    common = (
        "train.iters=2",
        "eval.iters=0",
        "train.precision=bf16",
        "data.seq_length=32",
        "train.global_batch_size=2",
    )
    assert trainer.train(make_config(tmp_path / "ds", tiny_mixtral, tiny_dataset, *common)) == 0
    run = _run(make_config(tmp_path / "fsdp", tiny_mixtral, tiny_dataset, *common, FSDP))
    policy = run.engine.module._get_fsdp_state()._mp_policy
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert all(p.dtype == torch.float32 for p in run.engine.module.parameters())
    a, b = _records(tmp_path / "ds"), _records(tmp_path / "fsdp")
    assert [r[0] for r in b] == pytest.approx([r[0] for r in a], rel=1e-2)
    del run
    gc.collect()


def test_conversion_gives_the_trainer_weights(tmp_path, tiny_mixtral, tiny_dataset):
    """The converted checkpoint, the live export and the trainer's own weights are the same model."""
    cfg = make_config(
        tmp_path,
        tiny_mixtral,
        tiny_dataset,
        FSDP,
        "train.iters=2",
        "eval.iters=0",
        f"checkpoint.save={tmp_path / 'ckpt'}",
        "checkpoint.save_hf=true",
    )
    run = _run(cfg)
    assert _layer_sharded_after_forward(run.engine.module)  # fsdp_reshard_after_forward defaults to true
    full = get_model_state_dict(run.engine.module, options=StateDictOptions(full_state_dict=True))
    del run
    gc.collect()
    state = json.loads((tmp_path / "ckpt" / "iter_0000002" / "run_state.json").read_text())
    assert state["engine"] == "fsdp2" and state["zero_stage"] is None
    converted = convert_checkpoint(tmp_path / "ckpt", tmp_path / "converted")
    exported = tmp_path / "ckpt" / "iter_0000002" / "hf"
    model = AutoModelForCausalLM.from_pretrained(str(converted))
    trained = {k.removeprefix("model."): v for k, v in full.items()}
    assert set(weight_map(converted)) == set(weight_map(exported)) == expected_keys(tiny_mixtral)
    assert_released_layout(converted, tiny_mixtral)
    assert_released_layout(exported, tiny_mixtral)
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())
    ids = probe_ids()
    assert torch.equal(logits_of(converted, ids), logits_of(exported, ids))


@pytest.mark.distributed
def test_two_process_fsdp2_matches_zero3_and_reshards_to_one(
    tmp_path, tiny_mixtral, tiny_dataset, zero3_two_processes
):
    """2-process FSDP2 == 2-process ZeRO-3 (same losses); its step-2 checkpoint resumes on 1 process."""
    common = TWO_PROCESS_COMMON  # the settings of the ZeRO-3 run (tests/conftest.py)
    (tmp_path / "fsdp").mkdir()
    ckpt = tmp_path / "fsdp" / "ckpt"
    first = write_config(
        tmp_path / "fsdp",
        tiny_mixtral,
        tiny_dataset,
        *common,
        FSDP,
        f"checkpoint.save={ckpt}",
        "train.exit_interval=2",
    )
    out = run_cli_distributed(["train", str(first)], world_size=2, launcher=DIRECT, timeout=600)
    assert "2 process(es) (torchrun), FSDP2" in out.stdout
    assert (
        "process start (built on meta, each rank read only its shards); peak host memory per rank: rank 0 "
        in out.stdout
    )
    assert sorted(p.name for p in (ckpt / "iter_0000002").glob("*.distcp")) == [
        "__0_0.distcp",
        "__1_0.distcp",
    ]
    converted = convert_checkpoint(ckpt / "iter_0000002", tmp_path / "converted2")
    second = make_config(
        tmp_path / "fsdp",
        tiny_mixtral,
        tiny_dataset,
        *common,
        FSDP,
        f"checkpoint.save={ckpt}",
        f"checkpoint.load={ckpt}",
    )
    assert trainer.train(second) == 0  # one process, resharded from two
    a, b = step_records(zero3_two_processes.dir / "run"), step_records(tmp_path / "fsdp" / "run")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        for key in ("lm_loss", "aux_loss", "z_loss"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-4, abs=1e-6), (step, key)
        # ZeRO-3 sums its partitions' norms in another order: differences of ~1e-4
        assert b[step]["grad_norm"] == pytest.approx(a[step]["grad_norm"], rel=1e-3), step
        assert b[step]["consumed_samples"] == a[step]["consumed_samples"]
    assert json.loads((ckpt / "iter_0000004" / "run_state.json").read_text())["world_size"] == 1
    assert_released_layout(converted, tiny_mixtral)  # a 2-process DCP checkpoint, in the released layout


@pytest.mark.distributed
def test_hybrid_sharding_matches_one_process(tmp_path, tiny_mixtral, tiny_dataset):
    """fsdp_shard_size=1 on 2 processes (a 2 x 1 replicate x shard mesh) trains like one process."""
    common = ("train.iters=2", "eval.iters=0", FSDP)
    (tmp_path / "hsdp").mkdir()
    config = write_config(
        tmp_path / "hsdp", tiny_mixtral, tiny_dataset, *common, "distributed.fsdp_shard_size=1"
    )
    run_cli_distributed(["train", str(config)], world_size=2, launcher=DIRECT, timeout=600)
    assert trainer.train(make_config(tmp_path / "one", tiny_mixtral, tiny_dataset, *common)) == 0
    a, b = _records(tmp_path / "one"), _records(tmp_path / "hsdp")
    assert len(a) == len(b) == 2
    assert [v for r in b for v in r] == pytest.approx([v for r in a for v in r], rel=1e-4)


@pytest.mark.parametrize("defer", [False, True])
def test_accumulation_reduces_every_micro_batch_unless_deferred(tmp_path, tiny_mixtral, tiny_dataset, defer):
    """Default: a micro-batch before the boundary already leaves sharded gradients (reduce-scattered, so no
    unsharded copy of the model's gradients waits for the boundary); deferred: none until the boundary."""
    cfg = make_config(
        tmp_path,
        tiny_mixtral,
        tiny_dataset,
        FSDP,
        "eval.iters=0",
        f"distributed.fsdp_defer_grad_sync={defer}",
    )
    run = trainer.setup(cfg)
    try:
        engine = run.engine
        assert run.grad_accum == 2 and engine.defer_grad_sync is defer
        ids = torch.randint(0, 100, (2, 16))
        out = engine(input_ids=ids, labels=ids)
        engine.backward(out["lm_loss_sum"] / out["tokens"] + out["moe_loss"])
        grads = [p.grad for p in engine.module.parameters()]
        if defer:
            assert all(g is None for g in grads)
        else:
            assert all(isinstance(g, DTensor) for g in grads)
        engine.step()
        assert engine.get_global_grad_norm() is None  # not a boundary: no update yet
    finally:
        run.writer.close()
    del run
    gc.collect()


@pytest.mark.distributed
@pytest.mark.parametrize(
    "hybrid",
    # hybrid sharding with accumulation under `make test-slow` (test_hybrid_sharding_matches_one_process
    # runs it without accumulation in `make test`)
    [False, pytest.param(True, marks=pytest.mark.slow)],
    ids=["fsdp", "and-hybrid"],
)
def test_two_process_accumulation_gives_the_same_losses_with_and_without_deferral(
    tmp_path, tiny_mixtral, tiny_dataset, hybrid
):
    """2 processes, accumulation 2: reduce-scattering every micro-batch == one reduction at the boundary,
    and == hybrid sharding (2 replicas x 1 shard), whose all-reduce across replicas runs at the boundary."""
    common = ("train.iters=3", "eval.iters=0", "train.micro_batch_size=1", FSDP)
    runs = {
        "every": "distributed.fsdp_defer_grad_sync=false",
        "deferred": "distributed.fsdp_defer_grad_sync=true",
    }
    if hybrid:
        runs["hybrid"] = "distributed.fsdp_shard_size=1"
    for name, extra in runs.items():
        (tmp_path / name).mkdir()
        config = write_config(tmp_path / name, tiny_mixtral, tiny_dataset, *common, extra)
        out = run_cli_distributed(["train", str(config)], world_size=2, launcher=DIRECT, timeout=600)
        assert "micro batch 1 x accumulation 2 x 2 ranks" in out.stdout
    a, b = _records(tmp_path / "every"), _records(tmp_path / "deferred")
    assert len(a) == len(b) == 3
    assert [v for r in a for v in r] == pytest.approx([v for r in b for v in r], rel=1e-5)
    if not hybrid:
        return
    c = _records(tmp_path / "hybrid")
    assert len(c) == 3
    assert [v for r in a for v in r[:2]] == pytest.approx([v for r in c for v in r[:2]], rel=1e-5)
    # the gradient norm over the 2D mesh is summed in another order (4e-5 here, with or without the
    # boundary-only all-reduce), as in test_hybrid_sharding_matches_one_process
    assert [r[2] for r in a] == pytest.approx([r[2] for r in c], rel=1e-4)
