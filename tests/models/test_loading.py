"""load_model: the fast experts path by default, clear errors for missing folders and kernels."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.utils import is_flash_attn_2_available

from moe_recipes.models.init import init_model
from moe_recipes.models.loading import load_model

from ..assets import MIXTRAL_TOKENIZER as TOKENIZER

SMALL = {
    "hidden_size": 32,
    "num_heads": 4,
    "num_kv_heads": 2,
    "num_experts": 4,
    "top_k": 2,
    "intermediate_size": 64,
    "expert_intermediate_size": 16,
    "max_position_embeddings": 128,
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("load")
    return {
        arch: init_model(arch, str(TOKENIZER), str(root / arch), **SMALL) for arch in ("qwen2_moe", "llama")
    }


def test_moe_model_loads_on_grouped_mm_with_same_weights(folders: dict[str, str]) -> None:
    model = load_model(folders["qwen2_moe"])
    assert model.config._experts_implementation == "grouped_mm"
    assert model.config._attn_implementation == "sdpa"
    reference = AutoModelForCausalLM.from_pretrained(folders["qwen2_moe"], experts_implementation="eager")
    ids = torch.randint(0, 32000, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-5, rtol=1e-5
        )


def test_eager_experts_and_dtype_on_request(folders: dict[str, str]) -> None:
    model = load_model(
        folders["qwen2_moe"],
        experts_implementation="eager",
        attn_implementation="eager",
        dtype=torch.bfloat16,
    )
    assert model.config._experts_implementation == "eager"
    assert model.config._attn_implementation == "eager"
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_dense_model_loads_with_default_experts_option(folders: dict[str, str]) -> None:
    model = load_model(folders["llama"])
    assert type(model).__name__ == "LlamaForCausalLM"


def test_missing_folder_and_config(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "absent"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(str(tmp_path / "empty"))


def test_unknown_experts_implementation(folders: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="experts_implementation"):
        load_model(folders["qwen2_moe"], experts_implementation="warp_speed")


@pytest.mark.skipif(is_flash_attn_2_available(), reason="flash-attn is installed here")
def test_flash_attention_without_package(folders: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="flash_attention_2.*not installed"):
        load_model(folders["llama"], attn_implementation="flash_attention_2")
