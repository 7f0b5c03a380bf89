"""Upcycling a dense model: function preservation at R=0, Drop-Upcycling statistics, CLI, and training."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from moe_recipes.cli import main
from moe_recipes.models.init import init_model
from moe_recipes.models.inspect import inspect_model
from moe_recipes.models.upcycle import upcycle, upcycle_model
from moe_recipes.train.trainer import train

from ..assets import MIXTRAL_TOKENIZER
from ..train.utils import make_config, step_records


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def dense_dir(request, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("dense") / request.param
    return init_model(
        arch=request.param,
        tokenizer_dir=str(MIXTRAL_TOKENIZER),
        output_dir=str(out),
        hidden_size=64,
        intermediate_size=96,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=256,
        seed=0,
    )


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_upcycled_logits_equal_the_dense_model(dense_dir, arch):
    dense = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32)
    if arch == "mixtral" and dense.config.model_type == "qwen2":
        with pytest.raises(ValueError, match="q_proj.bias"):  # Mixtral attention has no biases
            upcycle_model(dense, arch, experts=4, top_k=2)
        return
    moe = upcycle_model(dense, arch, experts=4, top_k=2)
    info = inspect_model(moe)
    assert info.num_experts == 4 and info.top_k == 2 and len(info.routers) == 2
    reference = _logits(dense)
    torch.testing.assert_close(_logits(moe), reference, rtol=1e-5, atol=1e-5)
    # the routers really route differently per token (small, not zero): the equality is not a degenerate case
    assert all(r.weight.abs().max() > 0 for _, r in info.routers)


def test_qwen3_moe_needs_query_key_norms(dense_dir):
    dense = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32)
    with pytest.raises(ValueError, match="q_norm"):
        upcycle_model(dense, "qwen3_moe", experts=4, top_k=2)


def test_drop_upcycling_redraws_a_share_of_neurons_per_expert(dense_dir):
    dense = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.float32)
    if dense.config.model_type != "llama":
        pytest.skip("one family is enough")
    moe = upcycle_model(dense, "mixtral", experts=4, top_k=2, drop_ratio=0.25, seed=3)
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
    again = upcycle_model(dense, "mixtral", experts=4, top_k=2, drop_ratio=0.25, seed=3)
    torch.testing.assert_close(again.model.layers[0].mlp.experts.gate_up_proj, experts.gate_up_proj)


def test_cli_writes_a_folder_that_trains(dense_dir, tmp_path, tiny_dataset):
    if "llama" not in dense_dir:
        pytest.skip("one family is enough")
    out = tmp_path / "moe"
    rc = main(
        ["upcycle", "--dense", dense_dir, "--arch", "mixtral", "--experts", "4", "--top-k", "2"]
        + ["--drop-ratio", "0.5", "--output", str(out)]
    )
    assert rc == 0
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
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
