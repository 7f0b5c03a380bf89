"""Balancing losses against hand-computed values, their split invariance, and the routing-bias update."""

from __future__ import annotations

import math

import pytest
import torch

from moe_recipes.models.balancing import (
    BalanceCoefs,
    GlobalLoad,
    balancing_losses,
    global_batch_loss_part,
    measure_global_load,
    pooled_global_batch_loss_part,
    sequence_loss,
    update_routing_bias,
)
from moe_recipes.models.inspect import inspect_model
from moe_recipes.models.losses import (
    expert_counts,
    load_balancing_loss,
    pooled_load_balancing_loss,
    switch_loss,
)

LN3 = math.log(3.0)


def test_sequence_loss_matches_hand_computed_values():
    # 2 sequences x 2 tokens, 2 experts, top-1.
    logits = torch.tensor([[LN3, 0.0], [0.0, 0.0], [0.0, LN3], [0.0, 0.0]])
    # seq 0: softmax rows (.75, .25), (.5, .5) -> P = (.625, .375); both tokens pick expert 0 -> f = (2, 0)
    # seq 1: P = (.375, .625); picks (0, 1) -> f = (1, 1)
    indices = torch.tensor([[0], [0], [0], [1]])
    expected = ((2 * 0.625) + (1 * 0.375 + 1 * 0.625)) / 2
    assert sequence_loss(logits, indices, batch_size=2).item() == pytest.approx(expected, rel=1e-6)
    # DeepSeek-V3: sigmoid scores normalised per token; sigmoid(ln 3) = .75, sigmoid(0) = .5 -> (.6, .4)
    p0 = ((0.6 + 0.5) / 2, (0.4 + 0.5) / 2)
    p1 = ((0.4 + 0.5) / 2, (0.6 + 0.5) / 2)
    expected_sig = ((2 * p0[0]) + (p1[0] + p1[1])) / 2
    got = sequence_loss(logits, indices, batch_size=2, sigmoid=True).item()
    assert got == pytest.approx(expected_sig, rel=1e-6)
    # The same tokens seen as one sequence: f = (3, 1) * 2 / 4, P = mean of the four softmax rows.
    p = (0.75 + 0.5 + 0.25 + 0.5) / 4
    one_seq = 1.5 * p + 0.5 * (1 - p)
    assert sequence_loss(logits, indices, batch_size=1).item() == pytest.approx(one_seq, rel=1e-6)


def test_sequence_loss_rejects_a_batch_size_that_does_not_divide():
    with pytest.raises(ValueError, match="3 sequences"):
        sequence_loss(torch.zeros(4, 2), torch.zeros(4, 1, dtype=torch.long), batch_size=3)


def test_global_batch_part_matches_hand_computed_value():
    logits = torch.tensor([[LN3, 0.0], [0.0, 0.0]])  # softmax sums over tokens: (1.25, .75)
    fraction = torch.tensor([0.8, 0.2])
    # E / T_global * sum_i f_i * sum_t p_ti with T_global = 10 tokens in the whole global batch
    expected = 2 / 10 * (0.8 * 1.25 + 0.2 * 0.75)
    assert global_batch_loss_part(logits, fraction, 10.0).item() == pytest.approx(expected, rel=1e-6)


def _splits(tokens: int) -> list[list[list[int]]]:
    """Ways to split the token rows: ranks x micro-batches of contiguous index ranges."""
    rows = list(range(tokens))
    quarter = tokens // 4
    return [
        [[rows]],  # 1 rank, 1 micro-batch
        [[rows[: 2 * quarter], rows[2 * quarter :]]],  # 1 rank, 2 micro-batches
        [
            [rows[:quarter], rows[quarter : 2 * quarter]],
            [rows[2 * quarter : 3 * quarter], rows[3 * quarter :]],
        ],
        [[rows[:quarter]], [rows[quarter:]]],  # 2 ranks, uneven: 1 micro-batch each
    ]


@pytest.mark.parametrize("split", range(4))
def test_global_batch_loss_is_invariant_to_ranks_and_accumulation(split):
    """Summed over micro-batches and ranks, value and gradient equal the loss of the whole batch at once."""
    torch.manual_seed(0)
    tokens, num_experts, top_k = 32, 4, 2
    base = torch.randn(tokens, num_experts)
    indices = torch.topk(
        base + torch.randn(tokens, num_experts), top_k, dim=-1
    ).indices  # not the softmax top-k
    whole = base.clone().requires_grad_(True)
    reference = load_balancing_loss(whole, indices, num_experts, top_k)
    reference.backward()

    parts_grad = base.clone().requires_grad_(True)
    ranks = _splits(tokens)[split]
    counts = sum(expert_counts([(base[mb], indices[mb])], num_experts).double() for r in ranks for mb in r)
    load = GlobalLoad(counts=counts, top_k=top_k)
    total = sum(
        global_batch_loss_part(parts_grad[mb], load.fraction[0], load.tokens) for r in ranks for mb in r
    )
    total.backward()
    assert total.item() == pytest.approx(reference.item(), rel=1e-5)
    torch.testing.assert_close(parts_grad.grad, whole.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("split", range(4))
def test_pooled_global_batch_loss_is_invariant_to_ranks_and_accumulation(split):
    """The HF form (layers pooled): summed parts == HF's loss of the whole batch, value and gradient."""
    torch.manual_seed(0)
    tokens, num_experts, top_k, layers = 32, 4, 2, 3
    base = [torch.randn(tokens, num_experts) for _ in range(layers)]
    indices = [torch.topk(b + torch.randn(tokens, num_experts), top_k, dim=-1).indices for b in base]
    whole = [b.clone().requires_grad_(True) for b in base]
    reference = pooled_load_balancing_loss(list(zip(whole, indices, strict=True)), num_experts, top_k)
    reference.backward()

    parts_grad = [b.clone().requires_grad_(True) for b in base]
    ranks = _splits(tokens)[split]
    counts = sum(
        expert_counts([(b[mb], ix[mb]) for b, ix in zip(base, indices, strict=True)], num_experts).double()
        for r in ranks
        for mb in r
    )
    load = GlobalLoad(counts=counts, top_k=top_k)
    total = sum(
        pooled_global_batch_loss_part([g[mb] for g in parts_grad], load.counts, load.tokens)
        for r in ranks
        for mb in r
    )
    total.backward()
    assert total.item() == pytest.approx(reference.item(), rel=1e-5)
    for got, want in zip(parts_grad, whole, strict=True):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("aux_type", ["hf", "per_layer"])
def test_balancing_losses_weights_and_validates(tiny_mixtral_model, aux_type):
    model, info = tiny_mixtral_model
    torch.manual_seed(0)
    captured = [(torch.randn(8, 4, requires_grad=True), torch.randint(0, 4, (8, 2))) for _ in info.routers]
    coefs = BalanceCoefs(micro_batch=0.1, global_batch=0.2, sequence=0.3, z=0.01, aux_loss_type=aux_type)
    counts = expert_counts(captured, 4).double()
    load = GlobalLoad(counts=counts, top_k=2, grad_scale=4.0)
    parts = balancing_losses(captured, info, coefs, batch_size=2, global_load=load)
    # the whole batch is one micro-batch here, so the global part equals the micro-batch loss
    assert parts["global_aux_loss"].item() == pytest.approx(parts["aux_loss"].item(), rel=1e-5)
    expected = (
        0.1 * parts["aux_loss"] + 0.2 * 4.0 * parts["global_aux_loss"] + 0.3 * parts["seq_aux_loss"]
    ) + 0.01 * parts["z_loss"]
    assert parts["moe_loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert coefs.total({k: v.item() for k, v in parts.items()}) == pytest.approx(
        (expected - 0.2 * 3.0 * parts["global_aux_loss"]).item(), rel=1e-6
    )
    assert parts["aux_loss"].item() == pytest.approx(switch_loss(captured, 4, 2, None, aux_type).item())
    with pytest.raises(ValueError, match="global expert counts"):
        balancing_losses(captured, info, coefs, batch_size=2, global_load=None)
    with pytest.raises(ValueError, match="aux_loss_type must be one of hf, per_layer"):
        BalanceCoefs(aux_loss_type="megatron")


@pytest.fixture(scope="module")
def tiny_mixtral_model(tiny_mixtral):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_mixtral)
    return model, inspect_model(model)


def test_measure_global_load_sums_micro_batches_then_reduces():
    batches = [torch.tensor([[1, 2]]), torch.tensor([[3, 4]])]
    seen = []
    load = measure_global_load(
        lambda b: b, batches, top_k=1, grad_scale=2.0, all_reduce=lambda t: seen.append(t.clone()) or t * 2
    )
    torch.testing.assert_close(seen[0], torch.tensor([[4.0, 6.0]], dtype=torch.float64))
    torch.testing.assert_close(load.counts, torch.tensor([[8.0, 12.0]], dtype=torch.float64))
    assert load.tokens == 20.0 and load.grad_scale == 2.0


def test_bias_update_follows_deepseek_v3_rule(tiny_deepseek_v3_model, tiny_mixtral_model):
    model, info = tiny_deepseek_v3_model
    routers = [r for _, r in info.routers]
    counts = torch.tensor([[10.0, 2.0, 5.0, 7.0]]).repeat(len(routers), 1)  # mean 6
    assert update_routing_bias(info, counts, 0.01) == len(routers)
    update_routing_bias(info, counts, 0.01)
    for router in routers:
        torch.testing.assert_close(router.e_score_correction_bias, torch.tensor([-0.02, 0.02, 0.02, -0.02]))
    with pytest.raises(ValueError, match="expected"):
        update_routing_bias(info, counts[:, :3], 0.01)
    with pytest.raises(ValueError, match="e_score_correction_bias"):
        update_routing_bias(tiny_mixtral_model[1], counts, 0.01)


@pytest.fixture(scope="module")
def tiny_deepseek_v3_model(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from moe_recipes.models.init import build_config, make_dims

    config = build_config(
        "deepseek_v3", make_dims("deepseek_v3", hidden_size=64, num_experts=4), vocab_size=128
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    return model, inspect_model(model)


@pytest.mark.parametrize("aux_type", ["hf", "per_layer"])
def test_padding_mask_leaves_padded_tokens_out_of_every_router_loss(tiny_mixtral_model, aux_type):
    """Two sequences of 5 and 3 real tokens padded to 5: with the mask, every loss equals the one computed
    from the real tokens alone (the sequence loss row by row), whatever the padded rows hold."""
    model, info = tiny_mixtral_model
    torch.manual_seed(1)
    layers = len(info.routers)
    captured = [(torch.randn(10, 4), torch.randint(0, 4, (10, 2))) for _ in range(layers)]
    mask = torch.tensor([1, 1, 1, 1, 1, 1, 1, 1, 0, 0], dtype=torch.bool)
    real = [(lg[mask], ix[mask]) for lg, ix in captured]
    coefs = BalanceCoefs(micro_batch=0.1, global_batch=0.2, sequence=0.3, z=0.01, aux_loss_type=aux_type)
    load = GlobalLoad(counts=expert_counts(captured, 4, mask).double(), top_k=2)
    assert torch.equal(load.counts, expert_counts(real, 4).double())
    parts = balancing_losses(captured, info, coefs, batch_size=2, global_load=load, mask=mask)
    if aux_type == "hf":
        aux = pooled_load_balancing_loss(real, 4, 2)
    else:
        aux = torch.stack([load_balancing_loss(lg, ix, 4, 2) for lg, ix in real]).mean()
    assert parts["aux_loss"].item() == pytest.approx(aux.item(), rel=1e-6)
    assert parts["global_aux_loss"].item() == pytest.approx(aux.item(), rel=1e-5)
    z = torch.stack([torch.logsumexp(lg, -1).pow(2).mean() for lg, _ in real]).mean()
    assert parts["z_loss"].item() == pytest.approx(z.item(), rel=1e-6)
    rows = [(slice(0, 5), 5), (slice(5, 8), 3)]
    seq = torch.stack(
        [torch.stack([sequence_loss(lg[r], ix[r], 1) for r, _ in rows]).mean() for lg, ix in captured]
    ).mean()
    assert parts["seq_aux_loss"].item() == pytest.approx(seq.item(), rel=1e-6)
    # and the padded rows really were counted before: without the mask the losses differ
    unmasked = balancing_losses(captured, info, coefs, batch_size=2, global_load=load)
    assert unmasked["aux_loss"].item() != pytest.approx(aux.item(), rel=1e-6)
    assert unmasked["seq_aux_loss"].item() != pytest.approx(seq.item(), rel=1e-6)
