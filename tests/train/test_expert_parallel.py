"""Expert parallelism with FSDP2: a 2-process EP=2 run gives the EP=1 run's losses and gradient norms; EP
checkpoints reshard and convert; misfits stop before anything loads. DeepSpeed: test_expert_parallel_deepspeed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moe_recipes.convert.hf import convert_checkpoint
from moe_recipes.models.init import init_model
from moe_recipes.train import trainer
from tests.assets import MIXTRAL_TOKENIZER
from tests.conftest import EP_FAMILIES
from tests.harness import DIRECT, run_cli_distributed

from ..convert.utils import logits_of, probe_ids
from .utils import make_config, metrics, step_records, write_config

FAMILIES = EP_FAMILIES


def _launch(workdir: Path, model: str, data: str, *extra: str) -> str:
    """Train on 2 processes (started directly, as a launcher would) in `workdir`; returns the output."""
    workdir.mkdir(parents=True)
    config = write_config(workdir, model, data, *extra)
    return run_cli_distributed(["train", str(config)], world_size=2, launcher=DIRECT, timeout=600).stdout


def _train(workdir: Path, model: str, data: str, *extra: str) -> dict[int, dict]:
    _launch(workdir, model, data, *extra)
    return step_records(workdir / "run")


PARITY = ("train.iters=10", "train.global_batch_size=8", "eval.iters=0", "optim.warmup_iters=2")


# Under `make test-slow`: every family's EP=2 run is also compared with its EP=1 run by a test below that
# `make test` runs (Mixtral: four processes; Qwen2-MoE: the MoE features; Qwen3-MoE: instruction
# tuning; DeepSeek-V3: resharded checkpoints), and tests/distributed/test_expert_parallel.py compares every
# family's dispatch with its local experts.
@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("arch", FAMILIES)
def test_fsdp2_ep2_matches_ep1(tmp_path, ep_models, tiny_dataset, arch):
    common = (*PARITY, "distributed.engine=fsdp2")
    ref = _train(tmp_path / "ep1", ep_models[arch], tiny_dataset, *common)
    ep = _train(
        tmp_path / "ep2", ep_models[arch], tiny_dataset, *common, "distributed.expert_parallel_size=2"
    )
    assert sorted(ref) == sorted(ep) == list(range(1, 11))
    for step in ref:
        for key in ("lm_loss", "aux_loss", "z_loss", "grad_norm"):
            assert ep[step][key] == pytest.approx(ref[step][key], rel=1e-5, abs=1e-8), (step, key)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


@pytest.mark.distributed
def test_fsdp2_ep_checkpoints_reshard_and_convert(tmp_path, ep_models, tiny_dataset):
    """EP=2 on 2 processes -> EP=1 on 1 process -> EP=2 on 2 processes, each resuming the other's DCP
    checkpoint, trains like one uninterrupted EP=1 run; `convert` of an EP checkpoint writes the very
    weights the live export gathers, and gives the reference run's logits."""
    model = ep_models["deepseek_v3"]  # shared experts, sigmoid routing with a correction bias, groups
    common = (
        "train.iters=6",
        "train.global_batch_size=8",
        "eval.iters=0",
        "distributed.engine=fsdp2",
        "moe.bias_update_rate=0.01",
    )
    ref = _train(tmp_path / "ref", model, tiny_dataset, *common, f"checkpoint.save={tmp_path / 'ref_ckpt'}")
    ckpt = tmp_path / "ckpt"
    ep = (*common, f"checkpoint.save={ckpt}", f"checkpoint.load={ckpt}", "train.exit_interval=2")
    first = _train(tmp_path / "a", model, tiny_dataset, *ep, "distributed.expert_parallel_size=2")
    (tmp_path / "b").mkdir()
    assert trainer.train(make_config(tmp_path / "b", model, tiny_dataset, *ep)) == 0  # 1 process
    last = _train(
        tmp_path / "c",
        model,
        tiny_dataset,
        *ep,
        "distributed.expert_parallel_size=2",
        "checkpoint.save_hf=true",
    )
    second = step_records(tmp_path / "b" / "run")
    got = {**first, **second, **last}
    assert sorted(first) == [1, 2] and sorted(second) == [3, 4] and sorted(last) == [5, 6]
    for step in ref:
        for key in ("lm_loss", "aux_loss", "grad_norm"):
            assert got[step][key] == pytest.approx(ref[step][key], rel=1e-5), (step, key)
    final = ckpt / "iter_0000006"
    assert json.loads((final / "run_state.json").read_text())["world_size"] == 2
    converted = convert_checkpoint(final, tmp_path / "converted")
    exported, written = _tensors(final / "hf"), _tensors(Path(converted))
    assert exported.keys() == written.keys()
    # all 4 experts, each in the released per-expert layout, although each rank held 2
    assert {k.split(".experts.")[1].split(".")[0] for k in written if ".experts." in k} == {
        "0",
        "1",
        "2",
        "3",
    }
    for name, tensor in written.items():
        assert torch.equal(tensor, exported[name]), name
    reference = convert_checkpoint(tmp_path / "ref_ckpt" / "iter_0000006", tmp_path / "ref_converted")
    ids = probe_ids()
    torch.testing.assert_close(logits_of(converted, ids), logits_of(reference, ids), rtol=1e-4, atol=1e-4)


@pytest.mark.distributed
@pytest.mark.parametrize(
    "features",
    [
        # `make test`: the losses over the global batch and per sequence, activation checkpointing,
        # evaluation, and frozen experts (the cut parameters themselves) in one run
        (
            "moe.global_aux_loss_coef=0.01",
            "moe.seq_aux_loss_coef=0.01",
            "train.activation_checkpointing=true",
            "eval.iters=2",
            "eval.interval=5",
            "moe.freeze=[experts]",
        ),
        # `make test-slow`: the per-layer aux loss; a frozen router is a replicated parameter like any other,
        # and the z-loss is on in every run here
        pytest.param(("moe.freeze=[experts]", "moe.aux_loss_type=per_layer"), marks=pytest.mark.slow),
        pytest.param(("moe.freeze=[router]", "moe.z_loss_coef=0.01"), marks=pytest.mark.slow),
    ],
    ids=["global-seq-aux-checkpointing-frozen-experts", "frozen-experts-per-layer", "frozen-router"],
)
def test_fsdp2_ep_keeps_the_moe_features(tmp_path, ep_models, tiny_dataset, features):
    common = (*PARITY, "distributed.engine=fsdp2", *features)
    ref = _train(tmp_path / "ep1", ep_models["qwen2_moe"], tiny_dataset, *common)
    ep = _train(
        tmp_path / "ep2", ep_models["qwen2_moe"], tiny_dataset, *common, "distributed.expert_parallel_size=2"
    )
    keys = ["lm_loss", "aux_loss", "z_loss", "grad_norm"]
    keys += [k for k in ("global_aux_loss", "seq_aux_loss") if ref[1][k] is not None]
    valid = [
        [r["valid_loss"] for r in metrics(tmp_path / d / "run") if "valid_loss" in r] for d in ("ep1", "ep2")
    ]
    assert len(valid[0]) == (2 if "eval.iters=2" in features else 0)  # evaluated at steps 5 and 10
    assert valid[1] == pytest.approx(valid[0], rel=1e-5)
    for step in ref:
        assert ep[step]["expert_share"] == ref[step]["expert_share"], step  # same routing, same counts
        for key in keys:
            assert ep[step][key] == pytest.approx(ref[step][key], rel=1e-5, abs=1e-8), (step, key)


@pytest.mark.slow  # `make test`: test_compute_dtype compares FSDP2 EP's first bf16 step with every engine's
@pytest.mark.distributed
def test_fsdp2_ep_in_bf16_tracks_ep1(tmp_path, ep_models, tiny_dataset):
    """bf16 compute: tokens travel in bf16; the losses follow the EP=1 run to bf16 rounding."""
    # 3 steps of one 2 x 32-token micro-batch per rank: bf16 is emulated (40-60x slower) without bf16 units
    common = (
        "train.iters=3",
        "train.global_batch_size=4",
        "data.seq_length=32",
        "eval.iters=0",
        "optim.warmup_iters=1",
        "distributed.engine=fsdp2",
        "train.precision=bf16",
    )
    ref = _train(tmp_path / "ep1", ep_models["mixtral"], tiny_dataset, *common)
    ep = _train(
        tmp_path / "ep2", ep_models["mixtral"], tiny_dataset, *common, "distributed.expert_parallel_size=2"
    )
    assert sorted(ref) == sorted(ep) == [1, 2, 3]
    for step in ref:
        # measured: lm_loss within 2e-5, grad norm within 4e-4 (bf16 GEMMs over other row groupings)
        assert ep[step]["lm_loss"] == pytest.approx(ref[step]["lm_loss"], rel=2e-4), step
        assert ep[step]["grad_norm"] == pytest.approx(ref[step]["grad_norm"], rel=4e-3), step


@pytest.fixture(scope="module")
def dense_model(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("dense") / "qwen2"
    return init_model(
        arch="qwen2",
        tokenizer_dir=str(MIXTRAL_TOKENIZER),
        output_dir=str(out),
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        max_position_embeddings=128,
    )


@pytest.mark.parametrize(
    ("world", "ep", "model", "message"),
    [
        (2, 4, "mixtral", "expert_parallel_size=4 does not divide the 2 processes"),
        (3, 2, "mixtral", "expert_parallel_size=2 does not divide the 3 processes"),
        (
            8,
            8,
            "mixtral",
            "expert_parallel_size=8 does not divide the model's 4 routed experts in model.path",
        ),
        (2, 2, "dense", "expert_parallel_size=2, but the model in model.path .* has no MoE layers"),
    ],
)
def test_ep_misfits_fail_before_anything_loads(
    tmp_path, ep_models, dense_model, tiny_dataset, nothing_expensive, monkeypatch, world, ep, model, message
):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    for var, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", str(world))):
        monkeypatch.setenv(var, value)
    path = dense_model if model == "dense" else ep_models[model]
    cfg = make_config(
        tmp_path, path, tiny_dataset, "distributed.engine=fsdp2", f"distributed.expert_parallel_size={ep}"
    )
    with pytest.raises(ValueError, match=message):
        trainer.train(cfg)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("distributed.expert_parallel_size=0",), "expert_parallel_size must be >= 1, got 0"),
        (
            ("distributed.expert_parallel_size=2", "distributed.fsdp_shard_size=1"),
            "expert_parallel_size=2 cannot be combined with distributed.fsdp_shard_size=1",
        ),
    ],
)
def test_ep_config_errors_name_the_values(tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        make_config(tmp_path, "model", "data", "distributed.engine=fsdp2", *extra)


@pytest.fixture(scope="module")
def four_process_runs(tmp_path_factory, ep_models, tiny_dataset):
    """`run(ep)`: step records of Mixtral trained on 4 processes with expert_parallel_size=ep (once each)."""
    common = ("train.iters=3", "train.global_batch_size=8", "train.micro_batch_size=1", "eval.iters=0")
    common += ("distributed.engine=fsdp2",)
    done: dict[int, dict[int, dict]] = {}

    def run(ep: int) -> dict[int, dict]:
        if ep not in done:
            work = tmp_path_factory.mktemp(f"four_ep{ep}")
            config = write_config(
                work, ep_models["mixtral"], tiny_dataset, *common, f"distributed.expert_parallel_size={ep}"
            )
            run_cli_distributed(["train", str(config)], world_size=4, launcher=DIRECT, timeout=600)
            done[ep] = step_records(work / "run")
        return done[ep]

    return run


@pytest.mark.distributed
@pytest.mark.parametrize("ep", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_four_processes_ep2_and_ep4_match_ep1(four_process_runs, ep):
    """4 ranks: EP=2 (two EP groups, each expert FSDP-sharded over 2 ranks; `make test`) and EP=4 (one
    expert a rank, a 4-way all-to-all; `make test-slow`)."""
    ref, got = four_process_runs(1), four_process_runs(ep)
    assert sorted(ref) == sorted(got) == [1, 2, 3]
    for step in ref:
        for key in ("lm_loss", "aux_loss", "grad_norm"):
            assert got[step][key] == pytest.approx(ref[step][key], rel=1e-5), (ep, step, key)


@pytest.mark.distributed
def test_fsdp2_ep_instruction_tuning_matches_ep1(tmp_path, ep_models):
    """Packed chat batches (padded tails, assistant-only labels) train the same with EP=2 as with EP=1."""
    from .test_chat_training import CHAT, _chat_files

    data = _chat_files(tmp_path)
    common = (*CHAT, "train.global_batch_size=8", "eval.iters=0", "distributed.engine=fsdp2")
    ref = _train(tmp_path / "ep1", ep_models["qwen3_moe"], data, *common)
    ep = _train(tmp_path / "ep2", ep_models["qwen3_moe"], data, *common, "distributed.expert_parallel_size=2")
    assert len(ref) >= 2 and sorted(ep) == sorted(ref)
    for step in ref:
        assert ep[step]["expert_share"] == ref[step]["expert_share"], step
        for key in ("lm_loss", "aux_loss", "grad_norm"):
            assert ep[step][key] == pytest.approx(ref[step][key], rel=1e-5), (step, key)
