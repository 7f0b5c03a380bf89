"""Upcycling a dense model: function preservation at R=0, Drop-Upcycling statistics, the streamed folder (dtype,
released layout, shard-size independence), CLI, and training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from moe_recipes.cli import main
from moe_recipes.convert.sources import state_dict_source
from moe_recipes.hf_folder import INDEX_FILE, layout_of
from moe_recipes.models.init import init_model
from moe_recipes.models.inspect import inspect_model
from moe_recipes.models.upcycle import upcycle
from moe_recipes.train.trainer import train

from ..assets import MIXTRAL_TOKENIZER
from ..train.utils import make_config, step_records


def _dense(out: Path, arch: str, dtype: str = "fp32") -> str:
    return init_model(
        arch=arch,
        tokenizer_dir=str(MIXTRAL_TOKENIZER),
        output_dir=str(out),
        hidden_size=64,
        intermediate_size=96,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=256,
        seed=0,
        dtype=dtype,
    )


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def dense_dir(request, tmp_path_factory) -> str:
    return _dense(tmp_path_factory.mktemp("dense") / request.param, request.param)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> str:
    """The dense Llama alone, for tests where one family is enough."""
    return _dense(tmp_path_factory.mktemp("dense") / "llama", "llama")


def _upcycled(dense_dir: str, out: Path, arch: str, **kw) -> torch.nn.Module:
    upcycle(dense_dir, arch, 4, 2, str(out), **kw)
    return AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)


def _file_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a folder's safetensors shards, by released name."""
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            out |= {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - safe_open is no dict
    return out


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_upcycled_logits_equal_the_dense_model(dense_dir, arch, tmp_path):
    dense = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32)
    if arch == "mixtral" and dense.config.model_type == "qwen2":
        with pytest.raises(ValueError, match="q_proj.bias"):  # Mixtral attention has no biases
            upcycle(dense_dir, arch, 4, 2, str(tmp_path / "moe"))
        assert not (tmp_path / "moe").exists()  # nothing half-written left behind
        return
    moe = _upcycled(dense_dir, tmp_path / "moe", arch)
    info = inspect_model(moe)
    assert info.num_experts == 4 and info.top_k == 2 and len(info.routers) == 2
    reference = _logits(dense)
    torch.testing.assert_close(_logits(moe), reference, rtol=1e-5, atol=1e-5)
    # the routers really route differently per token (small, not zero): the equality is not a degenerate case
    assert all(r.weight.abs().max() > 0 for _, r in info.routers)


def test_qwen3_moe_needs_query_key_norms(dense_dir, tmp_path):
    with pytest.raises(ValueError, match="q_norm"):
        upcycle(dense_dir, "qwen3_moe", 4, 2, str(tmp_path / "moe"))


def test_drop_upcycling_redraws_a_share_of_neurons_per_expert(llama_dir, tmp_path):
    dense_dir = llama_dir
    dense = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32)
    moe = _upcycled(dense_dir, tmp_path / "a", "mixtral", drop_ratio=0.25, seed=3)
    mlp = dense.model.layers[0].mlp
    experts = moe.model.layers[0].mlp.experts
    width = mlp.gate_proj.weight.shape[0]
    kept_sets = []
    for e in range(4):
        gate = experts.gate_up_proj[e, :width]
        same_rows = (gate == mlp.gate_proj.weight).all(dim=1)
        same_cols = (experts.down_proj[e] == mlp.down_proj.weight).all(dim=0)
        assert int((~same_rows).sum()) == round(0.25 * width)  # exactly R of the neurons re-drawn
        assert torch.equal(same_rows, same_cols)  # the same neurons in gate, up and down
        assert torch.equal(same_rows, (experts.gate_up_proj[e, width:] == mlp.up_proj.weight).all(dim=1))
        redrawn = gate[~same_rows]
        w = mlp.gate_proj.weight
        assert redrawn.std().item() == pytest.approx(w.std().item(), rel=0.2)
        kept_sets.append(tuple(same_rows.tolist()))
    assert len(set(kept_sets)) == 4  # every expert dropped different neurons
    # layer 1's experts draw their own neurons (each (layer, expert) has its own generator)
    layer1 = moe.model.layers[1].mlp.experts.gate_up_proj
    kept1 = (layer1[:, :width] == dense.model.layers[1].mlp.gate_proj.weight).all(dim=2)
    assert not set(kept_sets) & {tuple(row.tolist()) for row in kept1}
    other_seed = _upcycled(dense_dir, tmp_path / "b", "mixtral", drop_ratio=0.25, seed=4)
    assert not torch.equal(other_seed.model.layers[0].mlp.experts.gate_up_proj, experts.gate_up_proj)


@pytest.mark.parametrize("drop_ratio", [0.0, 0.5])
def test_folder_is_the_released_layout_whatever_the_shard_size(dense_dir, drop_ratio, tmp_path):
    arch = "mixtral" if "llama" in dense_dir else "qwen2_moe"
    one, many = tmp_path / "one", tmp_path / "many"
    upcycle(dense_dir, arch, 4, 2, str(one), drop_ratio=drop_ratio, seed=5)
    upcycle(dense_dir, arch, 4, 2, str(many), drop_ratio=drop_ratio, seed=5, max_shard_size="40KB")
    assert len(list(one.glob("*.safetensors"))) == 1 and len(list(many.glob("*.safetensors"))) > 3
    written, resharded = _file_tensors(one), _file_tensors(many)
    assert written.keys() == resharded.keys()
    assert all(torch.equal(written[k], resharded[k]) for k in written)  # the draws ignore the shard size
    index = json.loads((many / INDEX_FILE).read_text())["weight_map"]
    assert set(index) == set(resharded)
    expert = (
        "model.layers.0.block_sparse_moe.experts.3.w1.weight"
        if arch == "mixtral"
        else "model.layers.0.mlp.experts.3.gate_proj.weight"
    )
    assert expert in written
    # what save_pretrained writes for the same weights: names, shapes, dtypes and values
    saved = tmp_path / "saved"
    AutoModelForCausalLM.from_pretrained(str(one)).save_pretrained(str(saved))
    reference = _file_tensors(saved)
    assert written.keys() == reference.keys()
    for key, value in reference.items():
        assert written[key].dtype == value.dtype and torch.equal(written[key], value), key
    config = json.loads((one / "config.json").read_text())
    assert config == json.loads((saved / "config.json").read_text())  # architectures, dtype, ... as saved


def test_bf16_dense_gives_bf16_shards(tmp_path):
    dense_dir = _dense(tmp_path / "dense", "qwen2", dtype="bf16")
    out = tmp_path / "moe"
    upcycle(dense_dir, "qwen2_moe", 4, 2, str(out))
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    written = _file_tensors(out)
    config = AutoConfig.from_pretrained(str(out))
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    layout = layout_of(meta, torch.bfloat16)  # bf16, except what the class keeps in fp32
    expected = {f.name: spec.dtype for spec in layout.specs for f in layout.released.pieces[spec.name]}
    assert {k: v.dtype for k, v in written.items()} == expected
    dense = _file_tensors(Path(dense_dir))
    key = "model.layers.1.mlp.{}.weight"
    for proj in ("gate_proj", "up_proj"):  # R=0: each routed expert is the dense MLP, bit for bit
        assert torch.equal(written[key.format(f"experts.2.{proj}")], dense[key.format(proj)])
        assert torch.equal(written[key.format(f"shared_expert.{proj}")], dense[key.format(proj)])
    assert torch.equal(written[key.format("experts.2.down_proj")], dense[key.format("down_proj")] * 0.5)
    moe = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32)
    torch.testing.assert_close(_logits(moe), _logits(ref), rtol=1e-5, atol=1e-5)


def test_cli_writes_a_folder_that_trains(llama_dir, tmp_path, tiny_dataset):
    dense_dir = llama_dir
    out = tmp_path / "moe"
    rc = main(
        ["upcycle", "--dense", dense_dir, "--arch", "mixtral", "--experts", "4", "--top-k", "2"]
        + ["--drop-ratio", "0.5", "--max-shard-size", "100KB", "--output", str(out)]
    )
    assert rc == 0
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    assert len(list(out.glob("model-*.safetensors"))) > 1
    assert AutoModelForCausalLM.from_pretrained(str(out)).config.num_local_experts == 4
    assert main(["upcycle", "--dense", dense_dir, "--arch", "mixtral", "--experts", "4", "--top-k", "2",
                 "--output", str(out)]) == 2  # fmt: skip
    with pytest.raises(ValueError, match="already an MoE"):
        upcycle(str(out), "mixtral", 4, 2, str(tmp_path / "again"))
    cfg = make_config(tmp_path, str(out), tiny_dataset, "train.iters=2", "eval.iters=0")
    assert train(cfg) == 0
    records = list(step_records(tmp_path / "run").values())
    assert [r["step"] for r in records] == [1, 2]
    assert all(len(r["expert_share"]) == 2 for r in records)


def test_dense_reader_that_reopens_reads_the_same_tensors(dense_dir):
    kept, reopened = state_dict_source(dense_dir), state_dict_source(dense_dir, reopen=True)
    assert kept.keys() == reopened.keys()
    assert all(torch.equal(kept.get(k), reopened.get(k)) for k in kept.keys())  # noqa: SIM118
