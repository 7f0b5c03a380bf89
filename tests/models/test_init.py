"""init_model writes folders that plain transformers loads and trains, with the real tokenizers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from moe_recipes.models.init import ARCHITECTURES, init_model, make_dims
from moe_recipes.models.inspect import inspect_model

from ..assets import CORPUS_EN, DEEPSEEK_TOKENIZER, MIXTRAL_TOKENIZER

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


def _first_text() -> str:
    with open(CORPUS_EN) as f:
        return json.loads(f.readline())["text"][:400]


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_init_model_folder_loads_and_trains(arch: str, tmp_path: Path) -> None:
    out = init_model(arch, str(MIXTRAL_TOKENIZER), str(tmp_path / arch), **SMALL)
    folder = Path(out)
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
        assert (folder / name).is_file(), name
    assert not [p for p in tmp_path.iterdir() if p.name != arch]  # temp folder renamed away
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == ARCHITECTURES[arch].model_type
    assert config["vocab_size"] == 32000 and config["tie_word_embeddings"] is False
    assert (config["bos_token_id"], config["eos_token_id"], config.get("pad_token_id")) == (1, 2, None)
    model = AutoModelForCausalLM.from_pretrained(out)
    info = inspect_model(model)
    assert info.is_moe == ARCHITECTURES[arch].is_moe
    if info.is_moe:
        assert (info.num_experts, info.top_k) == (4, 2)
    model.train()
    ids = AutoTokenizer.from_pretrained(out)(_first_text(), return_tensors="pt").input_ids[:, :64]
    loss = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss) and abs(loss.item() - torch.log(torch.tensor(32000.0)).item()) < 1.0
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not [n for n in no_grad if "experts" not in n]  # random routing may leave an expert idle


def test_saved_tokenizer_encodes_like_the_source(tmp_path: Path) -> None:
    out = init_model("mixtral", str(MIXTRAL_TOKENIZER), str(tmp_path / "m"), **SMALL)
    text = _first_text()
    source = AutoTokenizer.from_pretrained(str(MIXTRAL_TOKENIZER))(text).input_ids
    saved = AutoTokenizer.from_pretrained(out)(text).input_ids
    assert saved == source and saved[0] == 1  # Mixtral's tokenizer adds BOS


def test_deepseek_tokenizer_sets_vocab_and_special_ids(tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(DEEPSEEK_TOKENIZER))
    out = init_model(
        "deepseek_v3", str(DEEPSEEK_TOKENIZER), str(tmp_path / "d"), **{**SMALL, "hidden_size": 16}
    )
    config = json.loads((Path(out) / "config.json").read_text())
    assert config["vocab_size"] == len(tokenizer) > 129000
    expected = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == expected
    weights = load_file(str(Path(out) / "model.safetensors"))
    assert weights["model.embed_tokens.weight"].shape == (len(tokenizer), 16)


def test_seed_and_dtype(tmp_path: Path) -> None:
    a = load_file(
        init_model("olmoe", str(MIXTRAL_TOKENIZER), str(tmp_path / "a"), seed=3, **SMALL)
        + "/model.safetensors"
    )
    b = load_file(
        init_model("olmoe", str(MIXTRAL_TOKENIZER), str(tmp_path / "b"), seed=3, **SMALL)
        + "/model.safetensors"
    )
    c = load_file(
        init_model("olmoe", str(MIXTRAL_TOKENIZER), str(tmp_path / "c"), seed=4, **SMALL)
        + "/model.safetensors"
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])
    bf16 = init_model("olmoe", str(MIXTRAL_TOKENIZER), str(tmp_path / "h"), dtype="bf16", **SMALL)
    assert {t.dtype for t in load_file(bf16 + "/model.safetensors").values()} == {torch.bfloat16}


def test_refuses_non_empty_output_unless_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "model"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match=str(target)):
        init_model("llama", str(MIXTRAL_TOKENIZER), str(target), **SMALL)
    assert (target / "keep.txt").is_file()
    init_model("llama", str(MIXTRAL_TOKENIZER), str(target), overwrite=True, **SMALL)
    assert not (target / "keep.txt").exists() and (target / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    empty = tmp_path / "empty"
    empty.mkdir()
    init_model("qwen2", str(MIXTRAL_TOKENIZER), str(empty), **SMALL)  # an empty folder is fine
    assert (empty / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"arch": "gpt9"}, "arch 'gpt9'"),
        ({"top_k": 5}, "top_k=5"),
        ({"hidden_size": 30}, "hidden_size=30"),
        ({"num_kv_heads": 3}, "num_kv_heads=3"),
        ({"num_layers": 0}, "num_layers"),
        ({"dtype": "fp8"}, "dtype 'fp8'"),
        ({"arch": "mixtral", "num_shared_experts": 1}, "num_shared_experts=1"),
        ({"arch": "qwen2_moe", "num_shared_experts": 0}, "num_shared_experts=0"),
    ],
)
def test_invalid_arguments_raise_value_error(kwargs: dict, match: str, tmp_path: Path) -> None:
    args = {"arch": "deepseek_v3", "tokenizer_dir": str(MIXTRAL_TOKENIZER), "output_dir": str(tmp_path / "x")}
    args.update({**SMALL, **kwargs})
    with pytest.raises(ValueError, match=match):
        init_model(**args)
    assert not (tmp_path / "x").exists()


def test_missing_tokenizer_dir(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        init_model("mixtral", str(tmp_path / "nowhere"), str(tmp_path / "out"), **SMALL)


def test_default_sizes() -> None:
    dims = make_dims("deepseek_v3", hidden_size=64, num_heads=8)
    assert (dims.intermediate_size, dims.expert_intermediate_size, dims.num_kv_heads) == (128, 64, 8)
    assert dims.num_shared_experts == 1
    assert make_dims("qwen3_moe").num_shared_experts == 0
    assert make_dims("llama", num_shared_experts=None).num_shared_experts == 0
