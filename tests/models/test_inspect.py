"""inspect_model / count_parameters / flops_per_token / RouterCapture on tiny random HF models."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from moe_recipes.models.init import ARCHITECTURES, build_config, make_dims
from moe_recipes.models.inspect import (
    RouterCapture,
    _routers_from_structure,
    count_parameters,
    flops_per_token,
    inspect_model,
)

MOE_ARCHS = [a for a, spec in ARCHITECTURES.items() if spec.is_moe]
DENSE_ARCHS = [a for a, spec in ARCHITECTURES.items() if not spec.is_moe]
VOCAB = 128

# arch -> (decoder layer class name, MoE layers out of 2, shared experts)
EXPECTED = {
    "mixtral": ("MixtralDecoderLayer", 2, 0),
    "qwen2_moe": ("Qwen2MoeDecoderLayer", 2, 1),
    "qwen3_moe": ("Qwen3MoeDecoderLayer", 2, 0),
    "deepseek_v3": ("DeepseekV3DecoderLayer", 1, 1),  # first_k_dense_replace=1: layer 0 is dense
    "olmoe": ("OlmoeDecoderLayer", 2, 0),
    "llama": ("LlamaDecoderLayer", 0, 0),
    "qwen2": ("Qwen2DecoderLayer", 0, 0),
}


def tiny_model(arch: str, seed: int = 0, **sizes: int) -> torch.nn.Module:
    """A 2-layer random model of ``arch`` with a 128-token vocabulary."""
    dims = {
        "hidden_size": 32,
        "num_layers": 2,
        "num_heads": 4,
        "num_kv_heads": 2,
        "num_experts": 4,
        "top_k": 2,
    }
    dims.update({"intermediate_size": 64, "expert_intermediate_size": 16, "max_position_embeddings": 64})
    dims.update(sizes)
    config = build_config(arch, make_dims(arch, **dims), vocab_size=VOCAB, eos_token_id=2)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def test_architectures_cover_the_required_families() -> None:
    assert set(EXPECTED) <= set(ARCHITECTURES)


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_inspect_finds_layers_routers_and_counts(arch: str) -> None:
    model = tiny_model(arch)
    info = inspect_model(model)
    layer_name, moe_layers, shared = EXPECTED[arch]
    assert {c.__name__ for c in info.decoder_layer_classes} == {layer_name}
    assert len(info.routers) == moe_layers
    if moe_layers == 0:
        assert info.router_class is None and not info.moe_block_classes and not info.is_moe
        assert (info.num_experts, info.top_k, info.num_shared_experts) == (0, 0, 0)
        return
    assert (info.num_experts, info.top_k, info.num_shared_experts) == (4, 2, shared)
    names = [name for name, _ in info.routers]
    first_moe = 2 - moe_layers
    assert [int(n.split(".")[2]) for n in names] == list(range(first_moe, 2))  # model.layers.<i>.mlp...
    for name, router in info.routers:
        assert model.get_submodule(name) is router and isinstance(router, info.router_class)
    blocks = [model.get_submodule(n.rpartition(".")[0]) for n in names]
    assert {type(b) for b in blocks} == info.moe_block_classes
    # The structural fallback (no _can_record_outputs) finds the same routers.
    assert [n for n, _ in _routers_from_structure(model)] == names


@pytest.mark.parametrize("arch", ["deepseek_v3", "qwen2_moe"])
def test_shared_experts_are_counted_in_routed_expert_units(arch: str) -> None:
    info = inspect_model(tiny_model(arch, num_shared_experts=2))
    assert info.num_shared_experts == 2


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_grouped_mm_matches_eager_loop(arch: str) -> None:
    """The fast expert path gives the HF per-expert loop's logits and gradients."""
    model = tiny_model(arch, seed=1)
    model.train()
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    results = {}
    for impl in ("eager", "grouped_mm"):
        model.set_experts_implementation(impl)
        assert model.config._experts_implementation == impl
        model.zero_grad()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if "experts" in n}
        results[impl] = (out.logits.detach(), grads)
    torch.testing.assert_close(results["grouped_mm"][0], results["eager"][0], atol=1e-5, rtol=1e-5)
    assert results["eager"][1]
    for name, grad in results["eager"][1].items():
        torch.testing.assert_close(results["grouped_mm"][1][name], grad, atol=1e-5, rtol=1e-5)


def test_count_parameters_tiny_mixtral_by_hand() -> None:
    model = tiny_model("mixtral", num_layers=2, expert_intermediate_size=16)
    counts = count_parameters(model)
    # H=32, heads=4 (head_dim 8), kv heads=2, E=4, k=2, expert width I=16, vocab V=128, 2 layers.
    attention = 32 * 32 + 32 * 16 + 32 * 16 + 32 * 32  # q, k, v (2 kv heads x 8), o  = 3072
    norms = 2 * 32
    router = 4 * 32
    experts = 4 * (2 * 16 * 32 + 32 * 16)  # gate_up (E, 2I, H) + down (E, H, I) = 6144
    per_layer = attention + norms + router + experts  # 9408
    embedding = 128 * 32
    total = 2 * per_layer + embedding + 32 + 128 * 32  # + final norm + untied lm_head = 27040
    assert counts["total"] == total == 27040
    assert counts["embedding"] == embedding
    assert counts["routed_experts"] == 2 * experts
    assert counts["shared_experts"] == 0
    assert counts["active"] == total - 2 * experts // 2 == 20896
    assert counts["active_non_embedding"] == 20896 - 4096
    assert counts["total"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_active_parameters_below_total_for_moe_only(arch: str) -> None:
    counts = count_parameters(tiny_model(arch))
    if ARCHITECTURES[arch].is_moe:
        assert counts["active"] < counts["total"]
        assert counts["active"] == counts["total"] - counts["routed_experts"] // 2  # top-2 of 4
    else:
        assert counts["active"] == counts["total"] and counts["routed_experts"] == 0


def test_flops_per_token_formula() -> None:
    model = tiny_model("mixtral")
    seq = 16
    # 6 * active non-embedding params + 6 * layers * seq * heads * (qk dim + v dim)
    assert flops_per_token(model, seq) == 6 * (20896 - 4096) + 6 * 2 * seq * 4 * (8 + 8)
    # MLA has different q/k and v head dims: qk = nope 8 + rope 8, v = 8.
    deepseek = tiny_model("deepseek_v3")
    active = count_parameters(deepseek)["active_non_embedding"]
    assert flops_per_token(deepseek, seq) == 6 * active + 6 * 2 * seq * 4 * (16 + 8)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_router_capture_matches_hf_router_logits(arch: str) -> None:
    model = tiny_model(arch)
    info = inspect_model(model)
    ids = torch.randint(0, VOCAB, (2, 5))
    with RouterCapture(model, info) as capture:
        out = model(input_ids=ids, output_router_logits=True)
        layers = capture.layers()
    assert len(layers) == len(info.routers) == len(out.router_logits)
    for (logits, indices), reference in zip(layers, out.router_logits):
        assert logits.shape == (10, 4) and indices.shape == (10, 2) and indices.dtype == torch.int64
        torch.testing.assert_close(logits, reference.reshape(10, 4))
        assert int(indices.min()) >= 0 and int(indices.max()) < 4


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3"])
def test_router_capture_under_activation_checkpointing(arch: str) -> None:
    """One record per MoE layer per forward; backward recomputation adds none; routers get gradients."""
    model = tiny_model(arch)
    model.gradient_checkpointing_enable()
    model.train()
    info = inspect_model(model)
    capture = RouterCapture(model, info)
    ids = torch.randint(0, VOCAB, (2, 6))
    for _ in range(2):  # a second forward replaces the first one's records
        out = model(input_ids=ids, labels=ids)
        layers = capture.layers()
        assert len(layers) == len(info.routers)
        assert all(lg.shape == (12, 4) and ix.shape == (12, 2) for lg, ix in layers)
        assert all(lg.requires_grad for lg, _ in layers)
        aux = sum(torch.logsumexp(lg, -1).square().mean() for lg, _ in layers)
        model.zero_grad()
        (out.loss + aux).backward()
        after = capture.layers()
        assert len(after) == len(layers) and all(a[0] is b[0] for a, b in zip(after, layers))
    for _, router in info.routers:
        assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
    capture.remove()
    model(input_ids=ids)
    assert capture.layers() == []


def test_router_capture_via_base_model_and_clear() -> None:
    """A trainer that runs ``model.model`` itself (to apply a chunked LM head) is captured too."""
    model = tiny_model("qwen3_moe")
    info = inspect_model(model)
    capture = RouterCapture(model, info)
    model.model(input_ids=torch.randint(0, VOCAB, (1, 4)))
    assert len(capture.layers()) == 2
    capture.clear()
    assert capture.layers() == []
    # Calling a router outside any model forward (as a recompute does) is not recorded.
    info.routers[0][1](torch.randn(3, 32))
    assert capture.layers() == []
    capture.remove()


def test_inspect_and_counts_see_through_zero3_partitioning() -> None:
    """ZeRO-3 leaves each rank an empty local tensor and keeps the full shape in ds_shape / ds_numel."""
    model = tiny_model("qwen2_moe")
    before = inspect_model(model)
    counts = count_parameters(model, before)
    for p in model.parameters():
        p.ds_shape, p.ds_numel = p.shape, p.numel()
        p.data = torch.empty(0)
    after = inspect_model(model)
    assert [n for n, _ in after.routers] == [n for n, _ in before.routers]
    assert (after.num_experts, after.top_k, after.num_shared_experts) == (4, 2, 1)
    assert count_parameters(model, after) == counts
    assert [n for n, _ in _routers_from_structure(model)] == [n for n, _ in before.routers]
