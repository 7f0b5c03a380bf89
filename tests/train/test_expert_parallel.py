"""Expert parallelism in training: a 2-process EP=2 run gives the EP=1 run's losses and gradient norms."""

from __future__ import annotations

from pathlib import Path

import pytest

from moe_recipes.models.init import init_model
from tests.assets import MIXTRAL_TOKENIZER
from tests.harness import run_cli_distributed

from .utils import step_records, write_config

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3")


@pytest.fixture(scope="module")
def ep_models(tmp_path_factory) -> dict[str, str]:
    """One tiny model per family, 4 routed experts top-2 (DeepSeek-V3 with its group-limited routing)."""
    root = tmp_path_factory.mktemp("ep_models")
    return {
        arch: init_model(
            arch=arch,
            tokenizer_dir=str(MIXTRAL_TOKENIZER),
            output_dir=str(root / arch),
            hidden_size=64,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            num_experts=4,
            top_k=2,
            expert_intermediate_size=32,
            max_position_embeddings=512,
            seed=0,
        )
        for arch in FAMILIES
    }


def _train(workdir: Path, model: str, data: str, *extra: str) -> dict[int, dict]:
    workdir.mkdir(parents=True)
    config = write_config(workdir, model, data, *extra)
    run_cli_distributed(["train", str(config)], world_size=2, launcher="torchrun", timeout=600)
    return step_records(workdir / "run")


PARITY = ("train.iters=10", "train.global_batch_size=8", "eval.iters=0", "optim.warmup_iters=2")


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
