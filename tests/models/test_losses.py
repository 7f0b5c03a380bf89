"""MoE losses against hand-computed values and HF's function; chunked LM loss against full cross-entropy."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, CohereConfig, Gemma2Config, GraniteMoeConfig
from transformers.models.mixtral import modeling_mixtral
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
from transformers.models.qwen2_moe import modeling_qwen2_moe
from transformers.models.qwen3_moe import modeling_qwen3_moe

from moe_recipes.models.init import build_config, make_dims
from moe_recipes.models.inspect import RouterCapture, inspect_model
from moe_recipes.models.losses import (
    chunked_causal_lm_loss,
    expert_counts,
    lm_head_spec,
    load_balancing_loss,
    moe_losses,
    pooled_load_balancing_loss,
    router_z_loss,
    switch_loss,
)

LN3 = math.log(3.0)


def test_load_balancing_loss_by_hand_top1() -> None:
    # probs: three tokens (0.75, 0.25), one token (0.25, 0.75); routed 0, 0, 0, 1.
    logits = torch.tensor([[LN3, 0.0], [LN3, 0.0], [LN3, 0.0], [0.0, LN3]])
    indices = torch.tensor([[0], [0], [0], [1]])
    # f = (3/4, 1/4), P = (0.625, 0.375): 2 * (0.75 * 0.625 + 0.25 * 0.375) = 1.125
    assert load_balancing_loss(logits, indices, 2, 1).item() == pytest.approx(1.125)
    # Masking the last token: f = (1, 0), P = (0.75, 0.25) -> 2 * 0.75 = 1.5
    mask = torch.tensor([1, 1, 1, 0])
    assert load_balancing_loss(logits, indices, 2, 1, mask).item() == pytest.approx(1.5)


def test_load_balancing_loss_by_hand_top2() -> None:
    logits = torch.tensor([[math.log(2.0), 0.0, 0.0], [0.0, 0.0, 0.0]])  # probs (.5,.25,.25), (1/3,1/3,1/3)
    indices = torch.tensor([[0, 1], [0, 2]])  # f = (2, 1, 1) / 4
    # P = (5/12, 7/24, 7/24): 3 * (1/2 * 5/12 + 2 * 1/4 * 7/24) = 51/48
    assert load_balancing_loss(logits, indices, 3, 2).item() == pytest.approx(51 / 48)


def test_uniform_routing_gives_one_and_skew_more() -> None:
    indices = torch.tensor([[0, 1], [2, 3]] * 4)  # every expert gets 1/4 of the slots
    assert load_balancing_loss(torch.zeros(8, 4), indices, 4, 2).item() == pytest.approx(1.0)
    skewed_logits = torch.tensor([[3.0, 3.0, 0.0, 0.0]] * 8)
    skewed = load_balancing_loss(skewed_logits, torch.tensor([[0, 1]] * 8), 4, 2)
    assert skewed.item() > 1.5


@pytest.mark.parametrize("masked", [False, True])
def test_matches_hf_load_balancing_loss_for_one_layer(masked: bool) -> None:
    """HF normalises f by tokens only, so HF == top_k * ours for a single layer (value and gradient)."""
    torch.manual_seed(0)
    logits = torch.randn(20, 6, requires_grad=True)
    indices = torch.topk(logits.softmax(-1), 2, dim=-1).indices
    mask = (torch.rand(2, 10) > 0.3).long() if masked else None
    ours = load_balancing_loss(logits, indices, 6, 2, mask)
    hf = load_balancing_loss_func((logits,), 6, 2, mask)
    torch.testing.assert_close(2 * ours, hf)
    (ours_grad,) = torch.autograd.grad(ours, logits)
    (hf_grad,) = torch.autograd.grad(hf, logits)
    torch.testing.assert_close(2 * ours_grad, hf_grad)


def test_mask_equals_dropping_the_tokens() -> None:
    torch.manual_seed(1)
    logits = torch.randn(12, 4)
    indices = torch.randint(0, 4, (12, 2))
    mask = torch.tensor([1, 0] * 6, dtype=torch.bool)
    kept = mask.nonzero().squeeze(1)
    torch.testing.assert_close(
        load_balancing_loss(logits, indices, 4, 2, mask),
        load_balancing_loss(logits[kept], indices[kept], 4, 2),
    )
    torch.testing.assert_close(router_z_loss(logits, mask), router_z_loss(logits[kept]))


def test_shape_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="indices"):
        load_balancing_loss(torch.zeros(4, 3), torch.zeros(4, 1, dtype=torch.long), 3, 2)
    with pytest.raises(ValueError, match="mask"):
        router_z_loss(torch.zeros(4, 3), torch.ones(5))


def test_router_z_loss_by_hand() -> None:
    logits = torch.tensor([[0.0, 0.0], [LN3, 0.0]])  # logsumexp = ln 2, ln 4
    ln2 = math.log(2.0)
    assert router_z_loss(logits).item() == pytest.approx((ln2**2 + (2 * ln2) ** 2) / 2)
    assert router_z_loss(logits, torch.tensor([1, 0])).item() == pytest.approx(ln2**2)


def test_moe_losses_pool_layers_by_default_or_average_them_and_zero_without_routers() -> None:
    torch.manual_seed(2)
    layers = [(torch.randn(6, 4), torch.randint(0, 4, (6, 2))) for _ in range(3)]
    aux, z = moe_losses(layers, 4, 2)
    torch.testing.assert_close(aux, pooled_load_balancing_loss(layers, 4, 2))
    per_layer, _ = moe_losses(layers, 4, 2, aux_loss_type="per_layer")
    expected_aux = sum(load_balancing_loss(lg, ix, 4, 2) for lg, ix in layers) / 3
    expected_z = sum(router_z_loss(lg) for lg, _ in layers) / 3
    torch.testing.assert_close(per_layer, expected_aux)
    torch.testing.assert_close(z, expected_z)
    with pytest.raises(ValueError, match="aux_loss_type must be one of hf, per_layer"):
        switch_loss(layers, 4, 2, aux_loss_type="megatron")
    aux0, z0 = moe_losses([], 0, 0)
    assert aux0.item() == 0.0 and z0.item() == 0.0 and aux0.dtype == torch.float32
    weight = torch.ones(2, requires_grad=True)
    (weight.sum() + 0.01 * aux0 + 0.001 * z0).backward()  # adding them to a loss is harmless
    assert weight.grad is not None


def test_pooled_loss_by_hand_and_its_relation_to_the_per_layer_loss() -> None:
    """Two layers whose imbalances cancel when pooled: hf sees even routing (top_k), per_layer does not."""
    logits = torch.tensor([[LN3, 0.0], [LN3, 0.0]])  # probs (.75, .25) on both tokens
    other = logits.flip(-1)  # probs (.25, .75)
    to0, to1 = torch.tensor([[0], [0]]), torch.tensor([[1], [1]])
    # pooled: f = (2, 2) / 4 tokens, P = (.5, .5): 2 * (.5 * .5 + .5 * .5) = 1 (top_k = 1)
    assert pooled_load_balancing_loss([(logits, to0), (other, to1)], 2, 1).item() == pytest.approx(1.0)
    # per layer: f = (1, 0), P = (.75, .25): 2 * .75 = 1.5 for each layer
    assert switch_loss(
        [(logits, to0), (other, to1)], 2, 1, aux_loss_type="per_layer"
    ).item() == pytest.approx(1.5)
    # one layer, top-2 of 3 experts: hf == top_k x per_layer
    one = [(torch.tensor([[math.log(2.0), 0.0, 0.0], [0.0, 0.0, 0.0]]), torch.tensor([[0, 1], [0, 2]]))]
    assert pooled_load_balancing_loss(one, 3, 2).item() == pytest.approx(2 * 51 / 48)


def test_expert_counts() -> None:
    captured = [
        (torch.zeros(2, 3), torch.tensor([[0, 1], [0, 2]])),
        (torch.zeros(2, 3), torch.tensor([[2, 1], [2, 1]])),
    ]
    counts = expert_counts(captured, 3)
    assert counts.dtype == torch.int64
    assert counts.tolist() == [[2, 1, 1], [0, 2, 2]]
    assert expert_counts(captured, 3, mask=torch.tensor([1, 0])).tolist() == [[1, 1, 0], [0, 1, 1]]
    assert expert_counts([], 3).shape == (0, 3)


@pytest.mark.parametrize(
    ("arch", "module"),
    [("mixtral", modeling_mixtral), ("qwen2_moe", modeling_qwen2_moe), ("qwen3_moe", modeling_qwen3_moe)],
)
def test_aux_loss_from_capture_equals_hf_load_balancing_loss(arch, module) -> None:
    """3 MoE layers, a padded row: our default Switch loss from RouterCapture is HF's
    `load_balancing_loss_func` of the same router logits (and the model's own aux_loss), value and
    gradient, so `moe.aux_loss_coef = router_aux_loss_coef` weighs it as the model was trained."""
    config = build_config(arch, make_dims(arch, 32, 64, 16, 3, 4, 2, 8, 2), vocab_size=64)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    info = inspect_model(model)
    ids = torch.randint(0, 64, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 6:] = 0
    capture = RouterCapture(model, info)
    out = model(input_ids=ids, attention_mask=mask, output_router_logits=True)
    captured = capture.layers()
    assert len(captured) == len(out.router_logits) == 3
    aux, _ = moe_losses(captured, 8, 2, mask)
    hf = module.load_balancing_loss_func(out.router_logits, 8, 2, mask)
    torch.testing.assert_close(aux, hf)
    torch.testing.assert_close(aux, out.aux_loss)
    routers = [r.weight for _, r in info.routers]
    ours_grad = torch.autograd.grad(aux, routers, retain_graph=True)
    hf_grad = torch.autograd.grad(hf, routers)
    for a, b in zip(ours_grad, hf_grad, strict=True):
        torch.testing.assert_close(a, b)


def _full_ce(hidden, head, labels, scale=1.0, softcap=None):
    logits = head(hidden.reshape(-1, hidden.shape[-1])).float() * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, labels.reshape(-1), ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("chunk_size", [1, 4, 5, 21, 1024])
@pytest.mark.parametrize("scale,softcap", [(1.0, None), (0.5, 3.0)])
def test_chunked_loss_equals_full_cross_entropy(chunk_size: int, scale: float, softcap: float | None) -> None:
    torch.manual_seed(3)
    head = torch.nn.Linear(16, 50)
    hidden = torch.randn(3, 7, 16, requires_grad=True)
    labels = torch.randint(0, 50, (3, 7))
    labels[0, :3] = -100
    labels[2, -1] = -100
    total, count = chunked_causal_lm_loss(
        hidden, head, labels, chunk_size, logit_scale=scale, softcap=softcap
    )
    assert count.item() == 17
    total.backward()
    grads = (hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone())
    hidden.grad = None
    head.zero_grad()
    reference = _full_ce(hidden, head, labels, scale, softcap)
    reference.backward()
    torch.testing.assert_close(total, reference, atol=1e-5, rtol=1e-5)
    for ours, ref in zip(grads, (hidden.grad, head.weight.grad, head.bias.grad)):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(
            chunked_causal_lm_loss(hidden, head, labels, chunk_size, -100, scale, softcap)[0],
            reference,
            atol=1e-5,
            rtol=1e-5,
        )


def test_chunked_loss_keeps_no_full_logits_for_backward() -> None:
    """Nothing of vocabulary width is saved for backward outside the per-chunk checkpoints."""
    head = torch.nn.Linear(8, 97, bias=False)
    hidden = torch.randn(64, 8, requires_grad=True)
    labels = torch.randint(0, 97, (64,))
    saved_shapes: list[tuple[int, ...]] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved_shapes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        chunked_causal_lm_loss(hidden, head, labels, chunk_size=16)
    assert not any(97 in shape for shape in saved_shapes)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _full_ce(hidden, head, labels)
    assert any(97 in shape for shape in saved_shapes)  # the check itself can see full logits


def _tiny(config_class, **extra):
    sizes = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 32, "num_hidden_layers": 1}
    return config_class(
        **sizes, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, **extra
    )


@pytest.mark.parametrize(
    "config,expected",
    [
        (
            _tiny(GraniteMoeConfig, logits_scaling=4.0, num_local_experts=4, num_experts_per_tok=2),
            (0.25, None),
        ),
        (_tiny(Gemma2Config, final_logit_softcapping=3.0, head_dim=8), (1.0, 3.0)),
        (_tiny(CohereConfig, logit_scale=0.5), (0.5, None)),
        (
            build_config("mixtral", make_dims("mixtral", 32, 32, 16, 1, 4, 2, 4, 2), vocab_size=64),
            (1.0, None),
        ),
    ],
)
def test_lm_head_spec_reproduces_model_logits(config, expected) -> None:
    torch.manual_seed(4)
    model = AutoModelForCausalLM.from_config(config)
    spec = lm_head_spec(model)
    assert (spec["logit_scale"], spec["softcap"]) == pytest.approx(expected)
    ids = torch.randint(0, 64, (2, 9))
    labels = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        out = model(input_ids=ids)
        hidden = model.base_model(
            input_ids=ids
        ).last_hidden_state  # final-norm output, as the trainer gets it
        total, count = chunked_causal_lm_loss(hidden, model.get_output_embeddings(), labels, 4, **spec)
        reference = F.cross_entropy(out.logits.reshape(-1, 64).float(), labels.reshape(-1), reduction="sum")
    assert count.item() == 18
    torch.testing.assert_close(total, reference, atol=1e-4, rtol=1e-5)
