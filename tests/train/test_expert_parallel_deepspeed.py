"""Expert parallelism with DeepSpeed ZeRO 0-2: a 2-process EP=2 run gives the EP=1 run's losses and gradient
norms; its checkpoints resume exactly and convert to the trained model; unsupported combinations are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from moe_recipes.convert.hf import convert_checkpoint
from moe_recipes.train import trainer as trainer_mod
from moe_recipes.train.preflight import check_resume_compatible
from tests.conftest import EP_FAMILIES as FAMILIES
from tests.harness import DIRECT, run_cli_distributed

from ..convert.utils import assert_released_layout, logits_of, probe_ids
from .test_expert_parallel import PARITY, _launch
from .utils import make_config, step_records, write_config

DS_KEYS = ("lm_loss", "aux_loss", "z_loss", "grad_norm")
_worst: dict[str, float] = {}  # largest relative difference per metric over the parity tests (reported)


@pytest.fixture(scope="module")
def ds_runs(tmp_path_factory, ep_models, tiny_dataset):
    """`run(arch, stage, ep, *extra)`: the 2-process DeepSpeed run of that setting (trained once per module),
    saving its last step with a live HF export; returns its work folder."""
    done: dict[tuple, Path] = {}

    def run(arch: str, stage: int, ep: int, *extra: str) -> Path:
        key = (arch, stage, ep, extra)
        if key not in done:
            d = tmp_path_factory.mktemp(f"ds_{arch}_z{stage}_ep{ep}")
            out = _launch(
                d / "w",
                ep_models[arch],
                tiny_dataset,
                *PARITY,
                "distributed.engine=deepspeed",
                f"distributed.zero_stage={stage}",
                f"distributed.expert_parallel_size={ep}",
                f"checkpoint.save={d / 'w' / 'ckpt'}",
                "checkpoint.save_hf=true",
                *extra,
            )
            assert f"ZeRO-{stage}, {f'expert parallel {ep}, ' if ep > 1 else ''}micro batch" in out
            done[key] = d / "w"
        return done[key]

    return run


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


DS_SETTINGS = [(arch, 2) for arch in FAMILIES] + [("qwen3_moe", 0), ("mixtral", 1)]
# `make test` runs one setting: ZeRO-2 on Mixtral, whose runs the resume and conversion tests reuse. What
# differs between families is the dispatch, which tests/distributed/test_expert_parallel.py compares with EP=1
# for each of them, and which parameters are experts (shared experts are not:
# test_expert_modules_are_the_fused_experts). ZeRO-0's own expert-gradient reduction and global gradient norm
# are checked on the first step against every other engine by test_compute_dtype; ZeRO-1 runs DeepSpeed's
# stage 1/2 optimizer as ZeRO-2 does. The other settings, and ZeRO-0's resume (DeepSpeed's own load of its
# per-EP-rank files), run under `make test-slow`.
DS_DEFAULT = [("mixtral", 2)]


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("arch", "stage"),
    [s if s in DS_DEFAULT else pytest.param(*s, marks=pytest.mark.slow) for s in DS_SETTINGS],
    ids=[f"{a}-zero{s}" for a, s in DS_SETTINGS],
)
def test_deepspeed_ep2_matches_ep1(ds_runs, arch, stage):
    ref = step_records(ds_runs(arch, stage, 1) / "run")
    ep = step_records(ds_runs(arch, stage, 2) / "run")
    assert sorted(ref) == sorted(ep) == list(range(1, 11))
    for step in ref:
        for key in DS_KEYS:
            _worst[key] = max(_worst.get(key, 0.0), _rel(ep[step][key], ref[step][key]))
            assert ep[step][key] == pytest.approx(ref[step][key], rel=1e-5, abs=1e-8), (step, key)
    # clipping (train.grad_clip=1) was active, so the norms also decided the updates
    assert max(r["grad_norm"] for r in ref.values()) > 1.0
    print(f"\n[parity] worst relative differences so far: {_worst}")


@pytest.mark.distributed
@pytest.mark.parametrize("stage", [pytest.param(0, marks=pytest.mark.slow), 2])
def test_deepspeed_ep2_resume_continues_exactly(ds_runs, tmp_path, ep_models, tiny_dataset, stage):
    """Stopped after step 2 (train.exit_interval) and resumed: the uninterrupted run's losses."""
    arch = "qwen3_moe" if stage == 0 else "mixtral"
    whole = step_records(ds_runs(arch, stage, 2) / "run")
    work = tmp_path / "w"
    ckpt = work / "ckpt"
    common = (
        *PARITY,
        "distributed.engine=deepspeed",
        f"distributed.zero_stage={stage}",
        "distributed.expert_parallel_size=2",
        f"checkpoint.save={ckpt}",
        "checkpoint.save_hf=true",
    )
    _launch(work, ep_models[arch], tiny_dataset, *common, "train.exit_interval=2")
    assert (ckpt / "latest").read_text().strip() == "iter_0000002"
    state = json.loads((ckpt / "iter_0000002" / "run_state.json").read_text())
    assert state["expert_parallel_size"] == 2
    config = write_config(work, ep_models[arch], tiny_dataset, *common, f"checkpoint.load={ckpt}")
    out = run_cli_distributed(["train", str(config)], world_size=2, launcher=DIRECT, timeout=600)
    assert "resumed from" in out.stdout
    resumed = step_records(work / "run")
    assert sorted(resumed) == list(range(1, 11))
    worst = max(_rel(resumed[s][k], whole[s][k]) for s in whole for k in DS_KEYS)
    print(f"\n[resume] ZeRO-{stage}: worst relative difference {worst:.3g}")
    for step in whole:
        for key in DS_KEYS:
            assert resumed[step][key] == pytest.approx(whole[step][key], rel=1e-6, abs=1e-9), (step, key)


@pytest.mark.distributed
def test_deepspeed_ep2_checkpoint_converts_to_the_trained_model(ds_runs, ep_models, tmp_path):
    """`convert` of the EP=2 checkpoint (full experts in its model states) gives the model the live export
    wrote from the trained engine, and the EP=1 run's model."""
    arch = "mixtral"
    ep2, ep1 = ds_runs(arch, 2, 2), ds_runs(arch, 2, 1)
    converted = convert_checkpoint(ep2 / "ckpt", tmp_path / "ep2")
    reference = convert_checkpoint(ep1 / "ckpt", tmp_path / "ep1")
    assert_released_layout(converted, ep_models[arch])
    ids = probe_ids()
    logits = logits_of(converted, ids)
    assert torch.equal(logits, logits_of(ep2 / "ckpt" / "iter_0000010" / "hf", ids))  # the live export
    torch.testing.assert_close(logits, logits_of(reference, ids), rtol=1e-4, atol=1e-4)
    with safe_open(str(converted / "model-00001-of-00001.safetensors"), framework="pt") as f:
        assert (
            "model.layers.0.block_sparse_moe.experts.3.w1.weight" in f.keys()
        )  # every expert, released names


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ("distributed.zero_stage=3",),
            "expert_parallel_size=2 cannot be combined with distributed.zero_stage=3",
        ),
        (
            ("distributed.zero_stage=2", "distributed.offload_optimizer=true"),
            "expert_parallel_size=2 cannot be combined with distributed.offload_optimizer=true",
        ),
    ],
)
def test_deepspeed_ep_invalid_combinations_fail_in_the_config(tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        make_config(tmp_path, "unused", "unused", "distributed.expert_parallel_size=2", *extra)


@pytest.mark.parametrize(
    ("user", "message"),
    [
        (
            {"zero_optimization": {"stage": 3}},
            r"needs ZeRO stage 0, 1 or 2; the DeepSpeed config .* sets stage 3",
        ),
        ({"bf16": {"enabled": True}}, r"needs DeepSpeed's fp32 parameters .* enables bf16"),
    ],
)
def test_deepspeed_ep_refuses_a_deepspeed_json_it_was_not_verified_with(
    tmp_path, tiny_mixtral, tiny_dataset, nothing_expensive, user, message
):
    """Found by the preflight checks, before the rendezvous and the model load."""

    path = tmp_path / "ds.json"
    path.write_text(json.dumps(user))
    cfg = make_config(
        tmp_path,
        tiny_mixtral,
        tiny_dataset,
        "distributed.zero_stage=2",
        "distributed.expert_parallel_size=2",
        f"distributed.deepspeed_config={path}",
    )
    with pytest.raises(ValueError, match=message):
        trainer_mod.train(cfg)


def test_deepspeed_ep_zero0_checkpoint_resumes_only_with_its_expert_parallel_size(tmp_path, tiny_mixtral):
    """ZeRO 1-2 EP checkpoints reshard to another EP size (tests/train/test_reshard.py); ZeRO-0 ones do not."""
    ckpt = tmp_path / "iter_0000002"
    ckpt.mkdir()
    state = {"engine": "deepspeed", "world_size": 1, "zero_stage": 0, "expert_parallel_size": 2}
    (ckpt / "run_state.json").write_text(json.dumps(state))
    cfg = make_config(tmp_path, tiny_mixtral, "unused", "distributed.zero_stage=0")
    with pytest.raises(ValueError, match=r"written with ZeRO stage 0 \(1 process, ZeRO-0, EP 2\)"):
        check_resume_compatible(cfg, ckpt)


@pytest.mark.parametrize(
    ("user", "message"),
    [
        ({"zero_optimization": {"reduce_scatter": False}}, r"needs zero_optimization.reduce_scatter"),
        (
            {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}},
            r"cannot be combined with optimizer offload",
        ),
        ({"fp16": {"enabled": True}}, r"enables fp16"),
    ],
)
def test_deepspeed_ep_json_checks_name_the_setting(tmp_path, user, message):
    from moe_recipes.engines.deepspeed_ep import check_deepspeed_config
    from moe_recipes.engines.deepspeed_zero import deepspeed_config

    path = tmp_path / "ds.json"
    path.write_text(json.dumps(user))
    cfg = make_config(
        tmp_path,
        "unused",
        "unused",
        "distributed.zero_stage=2",
        "distributed.expert_parallel_size=2",
        f"distributed.deepspeed_config={path}",
    )
    check_deepspeed_config(make_config(tmp_path, "unused", "unused", "distributed.expert_parallel_size=2"))
    with pytest.raises(ValueError, match=message):
        check_deepspeed_config(cfg, deepspeed_config(cfg, 2))
