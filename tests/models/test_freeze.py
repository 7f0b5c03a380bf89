"""Freezing by kind and by pattern on tiny Mixtral / Qwen2-MoE models built from configs."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from moe_recipes.config import load_config
from moe_recipes.engines.optim import param_groups
from moe_recipes.models.freeze import count_trainable, freeze_parameters
from moe_recipes.models.init import build_config, make_dims
from moe_recipes.models.inspect import inspect_model


def _model(arch: str):
    config = build_config(arch, make_dims(arch, hidden_size=32, num_layers=3, num_experts=4), vocab_size=64)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    return model, inspect_model(model)


def _frozen(model) -> set[str]:
    return {n for n, p in model.named_parameters() if not p.requires_grad}


@pytest.mark.parametrize(
    ("kind", "selects"),
    [
        ("router", lambda n: n.endswith("mlp.gate.weight")),
        ("experts", lambda n: ".mlp.experts." in n),
        ("shared_experts", lambda n: ".shared_expert" in n),
        ("attention", lambda n: ".self_attn." in n),
        ("embeddings", lambda n: "embed_tokens" in n),
        ("lm_head", lambda n: n.startswith("lm_head")),
        ("layers:1-2", lambda n: n.startswith(("model.layers.1.", "model.layers.2."))),
        ("layers:0", lambda n: n.startswith("model.layers.0.")),
    ],
)
def test_each_kind_freezes_exactly_its_parameters(kind, selects):
    model, info = _model("qwen2_moe")
    names = [n for n, _ in model.named_parameters()]
    report = freeze_parameters(model, info, [kind])
    expected = {n for n in names if selects(n)}
    assert expected and _frozen(model) == expected
    frozen_numel = sum(p.numel() for n, p in model.named_parameters() if n in expected)
    assert report.frozen == frozen_numel and report.total == sum(p.numel() for p in model.parameters())
    # the optimizer never sees a frozen parameter
    in_optimizer = {id(p) for g in param_groups(model, 0.1) for p in g["params"]}
    assert all((id(p) in in_optimizer) == p.requires_grad for p in model.parameters())


def test_patterns_and_errors():
    model, info = _model("mixtral")
    report = freeze_parameters(model, info, patterns=[r"layers\.[02]\.post_attention"])
    assert _frozen(model) == {
        "model.layers.0.post_attention_layernorm.weight",
        "model.layers.2.post_attention_layernorm.weight",
    }
    assert report == count_trainable(model) and report.frozen == 64
    with pytest.raises(ValueError, match="shared_experts"):  # Mixtral has none: a typo must not pass silently
        freeze_parameters(model, info, ["shared_experts"])
    with pytest.raises(ValueError, match="nothing_like_this"):
        freeze_parameters(model, info, patterns=["nothing_like_this"])
    with pytest.raises(ValueError, match="3 decoder layers"):
        freeze_parameters(model, info, ["layers:2-3"])
    with pytest.raises(ValueError, match="every parameter"):
        freeze_parameters(model, info, patterns=["."])


def test_config_validates_freeze_keys():
    base = ["model.path=x", "data.path=y"]
    cfg = load_config(
        None, [*base, "moe.freeze=[router, 'layers:0-1']", "moe.freeze_patterns=['mlp\\.gate']"]
    )
    assert cfg.moe.freeze == ["router", "layers:0-1"]
    for bad, match in [
        ("moe.freeze=[routers]", "routers"),
        ("moe.freeze=['layers:3-1']", "empty layer range"),
        ("moe.freeze_patterns=['(']", "regular expression"),
        ("moe.freeze=3", "list of strings"),
        ("moe.bias_update_rate=-1", "bias_update_rate"),
        ("moe.seq_aux_loss_coef=-0.1", "seq_aux_loss_coef"),
        ("moe.aux_loss_type=megatron", "moe.aux_loss_type='megatron' is not one of hf, per_layer"),
    ]:
        with pytest.raises(ValueError, match=match):
            load_config(None, [*base, bad])


def test_zero3_partitioned_matrices_keep_their_weight_decay():
    """Under ZeRO-3's zero.Init a parameter's data is an empty 1-D partition; its real shape (ds_shape)
    decides the decay, else ZeRO-3 trained every matrix without weight decay."""
    import torch
    from torch import nn

    model = nn.Linear(4, 4)
    for p in model.parameters():
        p.ds_shape = p.shape  # what zero.Init leaves: the whole shape, and an empty partition as data
        p.data = torch.empty(0)
    groups = param_groups(model, 0.1)
    assert [(g["weight_decay"], [tuple(p.ds_shape) for p in g["params"]]) for g in groups] == [
        (0.1, [(4, 4)]),
        (0.0, [(4,)]),
    ]
