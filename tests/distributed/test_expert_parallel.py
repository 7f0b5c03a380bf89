"""The expert-parallel dispatch layer against the model's own experts, on 2 real processes (gloo).

Each rank feeds its own tokens through one MoE block twice: with all experts (the reference) and with
its half of them behind the all-to-all dispatch. Outputs, input gradients and router gradients must be the
rank's own; expert gradients must be the reference's summed over both ranks (the all-to-all backward
brings every token's contribution to the rank that holds the expert).
"""

from __future__ import annotations

import pytest
import torch

from moe_recipes.distributed.expert_parallel import EPLayout, check_expert_parallel, expert_modules
from tests.harness import run_distributed


def _block_parity(implementation: str, skew: bool) -> dict[str, float]:
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, MixtralConfig

    from moe_recipes.distributed.expert_parallel import shard_experts
    from moe_recipes.models.inspect import inspect_model

    config = MixtralConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, experts_implementation=implementation)
    info = inspect_model(model)
    block = info.moe_blocks[0][1]
    rank = dist.get_rank()
    if skew:  # positive inputs, weights +1 for experts 0-1 and -1 for 2-3: rank 1's experts get nothing
        with torch.no_grad():
            block.gate.weight.copy_(torch.tensor([1.0, 1.0, -1.0, -1.0])[:, None].expand(4, 32))
    torch.manual_seed(10 + rank)
    x = (torch.randn(2, 5, 32).abs() if skew else torch.randn(2, 5, 32)).requires_grad_()

    def run() -> tuple[torch.Tensor, ...]:
        x.grad = None
        model.zero_grad(set_to_none=True)
        y = block(x)
        (y.pow(2).sum() + y.sum()).backward()
        experts = block.experts
        return (
            y.detach(),
            x.grad.clone(),
            block.gate.weight.grad.clone(),
            experts.gate_up_proj.grad,
            experts.down_proj.grad,
        )

    ref_y, ref_dx, ref_router, ref_gate_up, ref_down = run()
    for grad in (ref_gate_up, ref_down):
        dist.all_reduce(grad)
    shard_experts(info, EPLayout(2, rank, 4), None)
    y, dx, router, gate_up, down = run()
    lo = 2 * rank
    return {
        "output": float((y - ref_y).abs().max()),
        "input grad": float((dx - ref_dx).abs().max()),
        "router grad": float((router - ref_router).abs().max()),
        "gate_up grad": float((gate_up - ref_gate_up[lo : lo + 2]).abs().max()),
        "down grad": float((down - ref_down[lo : lo + 2]).abs().max()),
        "local experts": float(block.experts.gate_up_proj.shape[0]),
        "expert grad norm": float(gate_up.norm()),
    }


CASES = (("grouped_mm", False), ("eager", False), ("grouped_mm", True))


def _block_parities() -> dict[tuple[str, bool], dict[str, float]]:
    """Every case on one rank (each builds its own model), so that one 2-process job serves the tests."""
    return {case: _block_parity(*case) for case in CASES}


@pytest.fixture(scope="module")
def parities() -> dict[tuple[str, bool], list[dict[str, float]]]:
    """{(implementation, skew): the ranks' results}, from one 2-process job (starting one costs seconds)."""
    ranks = run_distributed(_block_parities, 2)
    return {case: [r[case] for r in ranks] for case in CASES}


@pytest.mark.distributed
@pytest.mark.parametrize("implementation", ["grouped_mm", "eager"])
def test_dispatch_matches_the_local_experts(parities, implementation):
    for rank, shared in enumerate(parities[implementation, False]):
        result = dict(shared)  # the module's results stay whole
        assert result.pop("local experts") == 2
        assert result.pop("expert grad norm") > 0
        for what, diff in result.items():
            assert diff < 1e-5, (rank, what, diff)


@pytest.mark.distributed
def test_a_rank_whose_experts_get_no_tokens_still_takes_part(parities):
    """Every token goes to experts 0-1 (rank 0): rank 1 computes nothing, sends nothing back, and its
    experts get zero gradients, without leaving rank 0 waiting."""
    results = parities["grouped_mm", True]
    assert results[1]["expert grad norm"] == 0.0 and results[0]["expert grad norm"] > 0
    for rank, result in enumerate(results):
        for what in ("output", "input grad", "router grad", "gate_up grad", "down grad"):
            assert result[what] < 1e-5, (rank, what)


def test_layout_and_checks():
    layout = EPLayout(size=4, rank=3, num_experts=64)
    assert (layout.local_experts, layout.first_expert) == (16, 48)
    check_expert_parallel(1, 3, 0)  # off: nothing to check
    with pytest.raises(
        ValueError, match="expert_parallel_size=3 does not divide the model's 8 routed experts"
    ):
        check_expert_parallel(3, 6, 8)


def test_expert_modules_are_the_fused_experts():
    from transformers import AutoModelForCausalLM, Qwen2MoeConfig

    from moe_recipes.models.inspect import inspect_model

    config = Qwen2MoeConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=32,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    names = [name for name, _ in expert_modules(inspect_model(model))]
    assert names == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]  # not the shared expert


def test_experts_outside_the_interface_are_refused():
    """A block whose experts are not transformers' fused experts cannot be cut silently."""
    from torch import nn

    from moe_recipes.distributed.expert_parallel import shard_experts
    from moe_recipes.models.inspect import MoEInfo

    class Experts(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(4, 2, 2))

    block = nn.Module()
    block.experts = Experts()
    info = MoEInfo(set(), {type(block)}, None, [], 4, 2, 0, moe_blocks=[("layer.mlp", block)])
    with pytest.raises(ValueError, match=r"layer.mlp.experts \(Experts\) does not use transformers' experts"):
        shard_experts(info, EPLayout(2, 0, 4), None)
    block.experts = nn.ModuleList([nn.Linear(2, 2) for _ in range(4)])  # per-expert modules, no 3-D weights
    with pytest.raises(ValueError, match="needs fused experts"):
        shard_experts(info, EPLayout(2, 0, 4), None)
