"""The released layout (hf_layout.py) against transformers' own save_pretrained, for every supported family.

For each architecture a tiny random model is saved with `save_pretrained` (the reference) and converted from
its in-memory state dict with `convert_state_dict` (our writer). Both folders must hold the same tensor names,
shapes, dtypes and values, and load to the same logits. The reading direction (`FileTensor.rows`) rebuilds
every in-memory tensor from row ranges of the file tensors, as a rank that holds only some rows reads them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from moe_recipes.convert.hf import convert_state_dict
from moe_recipes.hf_folder import model_layout
from moe_recipes.hf_layout import released_layout

from .convert.utils import assert_released_layout

_ATTN = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
_MLA = {"q_lora_rank": 16, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8}
CONFIGS: dict[str, dict] = {
    "mixtral": {**_ATTN, "intermediate_size": 24, "num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {
        **_ATTN,
        "intermediate_size": 48,
        "moe_intermediate_size": 24,
        "shared_expert_intermediate_size": 24,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "decoder_sparse_step": 1,
    },
    "qwen3_moe": {
        **_ATTN,
        "intermediate_size": 48,
        "moe_intermediate_size": 24,
        "num_experts": 4,
        "num_experts_per_tok": 2,
    },
    "deepseek_v2": {
        **_ATTN,
        **_MLA,
        "num_key_value_heads": 4,
        "intermediate_size": 48,
        "moe_intermediate_size": 24,
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "n_shared_experts": 1,
        "first_k_dense_replace": 1,
    },
    "deepseek_v3": {
        **_ATTN,
        **_MLA,
        "num_key_value_heads": 4,
        "intermediate_size": 48,
        "moe_intermediate_size": 24,
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "n_shared_experts": 1,
        "n_group": 2,
        "topk_group": 1,
        "first_k_dense_replace": 1,
    },
    "olmoe": {**_ATTN, "intermediate_size": 24, "num_experts": 4, "num_experts_per_tok": 2},
    "llama": {**_ATTN, "intermediate_size": 48},
    "qwen2": {**_ATTN, "intermediate_size": 48},
}
# Families whose experts transformers 5 fuses in memory: their files must not hold the fused names.
MOE = {"mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "olmoe"}


def _tiny(arch: str, tmp_path: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A tiny random model as `from_pretrained` gives it in `dtype` (modules it keeps in fp32 stay fp32)."""
    config = AutoConfig.for_model(arch, vocab_size=128, **CONFIGS[arch])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    for name, buf in model.named_buffers():  # give DeepSeek-V3's routing bias values that matter
        if name.endswith("e_score_correction_bias"):
            buf.copy_(torch.randn(buf.shape) * 0.5)
    if dtype != torch.float32:
        model.save_pretrained(str(tmp_path / "fp32"))
        model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "fp32"), dtype=dtype)
    return model.eval()


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            out |= {k: f.get_tensor(k) for k in f.keys()}
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", list(CONFIGS))
def test_written_layout_equals_save_pretrained(tmp_path, arch, dtype):
    model = _tiny(arch, tmp_path, dtype)
    base = tmp_path / "save_pretrained"
    model.save_pretrained(str(base))
    state = tmp_path / "state.pt"  # the in-memory names, as a consolidated ZeRO state dict holds them
    torch.save(
        {
            k: v
            for k, v in model.state_dict().items()
            if k != "lm_head.weight" or not model.config.tie_word_embeddings
        },
        state,
    )
    ours = convert_state_dict(state, base, tmp_path / "ours", max_shard_size="20KB")
    assert len(list(ours.glob("*.safetensors"))) > 1  # several shards: a split tensor stays whole in one
    assert_released_layout(ours, base)
    got, want = _tensors(ours), _tensors(base)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    if arch in MOE:
        assert not [k for k in got if k.endswith(("gate_up_proj", "experts.down_proj"))]
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    reloaded = AutoModelForCausalLM.from_pretrained(str(ours), dtype=dtype).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "deepseek_v3", "llama"])
def test_rows_read_back_every_tensor_in_any_split(tmp_path, arch):
    """Any row range of any in-memory tensor is rebuilt from the file tensors that hold it, reading only
    rows of them: what a rank that holds rows a:b of a parameter reads."""
    model = _tiny(arch, tmp_path)
    model.save_pretrained(str(tmp_path / "base"))
    files = _tensors(tmp_path / "base")
    state = {
        k: v
        for k, v in model.state_dict().items()
        if k in model_layout(model.config, torch.float32).released.pieces
    }
    layout = released_layout(model, [(k, tuple(v.shape)) for k, v in state.items()])
    for name, whole in state.items():
        n = whole.shape[0] if whole.dim() else 1
        for start, stop in {(0, n), (0, max(1, n // 3)), (n // 3, n), (n // 4, max(n // 4 + 1, n // 2))}:
            local = torch.full((stop - start, *whole.shape[1:]), float("nan"))
            read = 0
            for f in layout.pieces[name]:
                hit = f.rows(start, stop)
                if hit is None:
                    continue
                file_index, dest = hit
                value = files[f.name][file_index]
                read += value.numel()
                f.put(local, value, dest)
            assert torch.equal(local, whole[start:stop]), (name, start, stop)
            assert read == local.numel()  # only the rows asked for, each once


def test_layout_of_a_real_size_model_is_quick():
    """The layout of Mixtral-8x7B (on meta) is found from probes that take no memory."""
    import resource
    import time

    config = AutoConfig.for_model(
        "mixtral",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        num_local_experts=8,
        vocab_size=32000,
    )
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    layout = model_layout(config, torch.bfloat16)
    took = time.perf_counter() - start
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    names = layout.released.file_names()
    assert len(names) == 32 * (8 * 3 + 1 + 4 + 2) + 3
    assert "model.layers.31.block_sparse_moe.experts.7.w2.weight" in names
    assert grown_mb < 500, f"computing the layout grew the peak RSS by {grown_mb:.0f} MB"
    assert took < 60


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_folders_in_the_old_fused_layout_load_and_convert_to_the_released_one(tmp_path, arch):
    """A folder written before the released layout (transformers 5's in-memory names) still loads, and
    `convert --base-model` of it, or of a released folder, writes the released layout with the same values."""
    from safetensors.torch import save_file

    from moe_recipes.models.loading import load_model

    model = _tiny(arch, tmp_path)
    released = tmp_path / "released"
    model.save_pretrained(str(released))
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_bytes((released / "config.json").read_bytes())
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(old / "model.safetensors"))
    assert any(k.endswith("experts.gate_up_proj") for k in _tensors(old))  # the fused in-memory names
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        assert torch.equal(load_model(str(old)).eval()(input_ids=ids).logits, expected)
    want = _tensors(released)
    for source in (old, released):
        out = convert_state_dict(source, released, tmp_path / f"from_{source.name}")
        assert_released_layout(out, released)
        got = _tensors(out)
        assert all(torch.equal(got[k], want[k]) for k in want), source.name


def test_write_shard_streams_a_file_safetensors_reads(tmp_path):
    """The streaming shard writer: mixed dtypes (aligned, widest first), released names, the same values
    through safetensors' own reader as through save_file."""
    from safetensors.torch import save_file

    from moe_recipes.hf_folder import TensorSpec, write_shard

    model = _tiny("deepseek_v3", tmp_path)
    layout = model_layout(model.config, torch.bfloat16)
    state = model.state_dict()
    specs = [s for s in layout.specs if ".layers.1." in s.name]  # experts, fp32 router and bias, bf16 rest
    assert {s.dtype for s in specs} == {torch.float32, torch.bfloat16}
    extra = TensorSpec("counts", (3,), torch.int64)  # an integer tensor among them
    layout.released.pieces["counts"] = released_layout(model, [("counts", (3,))]).pieces["counts"]
    values = {**{s.name: state[s.name].to(s.dtype) for s in specs}, "counts": torch.tensor([1, 2, 3])}
    produced = []

    def produce(spec: TensorSpec) -> dict[str, torch.Tensor]:
        produced.append(spec.name)
        return {k: v.contiguous() for k, v in layout.released.split(spec.name, values[spec.name]).items()}

    write_shard(tmp_path / "streamed.safetensors", layout, [*specs, extra], produce)
    assert sorted(produced) == sorted(s.name for s in [*specs, extra])  # each tensor produced once
    expected = {}
    for spec in [*specs, extra]:
        expected |= produce(spec)
    save_file(expected, str(tmp_path / "reference.safetensors"), metadata={"format": "pt"})
    with safe_open(str(tmp_path / "streamed.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        got = {k: f.get_tensor(k) for k in f.keys()}
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert got[name].dtype == value.dtype and torch.equal(got[name], value), name
    assert (tmp_path / "streamed.safetensors").stat().st_size == (
        tmp_path / "reference.safetensors"
    ).stat().st_size
