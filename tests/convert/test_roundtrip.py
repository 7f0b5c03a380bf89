"""Converted and exported folders give the trainer's logits exactly, for every ZeRO stage and architecture."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from moe_recipes.convert.hf import convert_checkpoint
from moe_recipes.hf_folder import load_hf_config, model_layout
from moe_recipes.infer.perplexity import evaluate_perplexity
from moe_recipes.models.init import ARCHITECTURES
from moe_recipes.train.trainer import train

from ..assets import MIXTRAL_TOKENIZER
from ..train.utils import make_config
from .utils import (
    SHORT,
    assert_released_layout,
    expected_keys,
    last_valid_loss,
    logits_of,
    make_base,
    probe_ids,
    train_with_reference,
    weight_map,
)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def check_folder(folder: Path, base: Path) -> None:
    """The folder's files: the base config byte for byte, tokenizer, shards + index of exactly the HF keys."""
    assert (folder / "config.json").read_bytes() == (base / "config.json").read_bytes()
    assert (folder / "generation_config.json").read_bytes() == (base / "generation_config.json").read_bytes()
    for name in TOKENIZER_FILES:
        assert (folder / name).read_bytes() == (base / name).read_bytes(), name
    wmap = weight_map(folder)
    assert set(wmap) == expected_keys(base)
    assert_released_layout(folder, base)
    stored: set[str] = set()
    for shard in set(wmap.values()):
        with safe_open(str(folder / shard), "pt") as f:
            stored |= set(f.keys())
    assert stored == set(wmap)
    assert not [p for p in folder.parent.iterdir() if ".tmp-" in p.name], "temporary folder left behind"


def assert_same_logits(folder: Path, reference: torch.Tensor, ids: torch.Tensor) -> None:
    diff = (logits_of(folder, ids) - reference).abs().max().item()
    assert diff < 1e-5, f"{folder}: max abs logit difference {diff}"


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_mixtral_convert_and_export_match_trainer(tmp_path, tiny_mixtral, tiny_dataset, stage):
    ids = probe_ids()
    cfg = make_config(
        tmp_path,
        tiny_mixtral,
        tiny_dataset,
        *SHORT,
        f"distributed.zero_stage={stage}",
        f"checkpoint.save={tmp_path / 'ckpt'}",
        "checkpoint.save_hf=true",
    )
    reference = train_with_reference(cfg, ids)
    # the save folder (via `latest`) converts to a folder beside it; the export sits in the checkpoint
    converted = convert_checkpoint(tmp_path / "ckpt", tmp_path / "converted")
    exported = tmp_path / "ckpt" / "iter_0000002" / "hf"
    for folder in (converted, exported):
        check_folder(folder, Path(tiny_mixtral))
        # the released layout (one tensor per expert), not transformers 5's fused in-memory tensors
        assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in weight_map(folder)
        assert not [k for k in weight_map(folder) if "gate_up_proj" in k]
        assert_same_logits(folder, reference, ids)
    if stage == 0:  # the eval command reproduces the trainer's validation loss on the same samples
        result = evaluate_perplexity(
            converted,
            tiny_dataset,
            seq_length=64,
            split="90,10,0",
            max_samples=2 * 4,
            cache_dir=str(tmp_path / "cache"),
            progress=False,
        )
        assert result.loss == pytest.approx(last_valid_loss(tmp_path / "run"), rel=1e-5)
        assert result.tokens == 2 * 4 * 64  # eval.iters x global batch samples of 64 tokens


# Every architecture besides mixtral, each under another ZeRO stage; llama with tied embeddings, DeepSeek-V3
# with non-zero expert-bias buffers.
ARCH_CASES = [
    ("qwen2_moe", 2, {}),
    ("qwen3_moe", 0, {}),
    ("deepseek_v3", 3, {"expert_bias": True}),
    ("olmoe", 1, {}),
    ("llama", 3, {"tie": True}),
    ("qwen2", 0, {}),
]


def test_every_architecture_is_covered():
    assert {arch for arch, _, _ in ARCH_CASES} | {"mixtral"} == set(ARCHITECTURES)


@pytest.mark.parametrize(("arch", "stage", "options"), ARCH_CASES, ids=[c[0] for c in ARCH_CASES])
def test_architecture_round_trip(tmp_path, tiny_dataset, arch, stage, options):
    ids = probe_ids()
    base = Path(make_base(arch, MIXTRAL_TOKENIZER, tmp_path / "base", **options))
    cfg = make_config(
        tmp_path,
        str(base),
        tiny_dataset,
        *SHORT,
        f"distributed.zero_stage={stage}",
        f"checkpoint.save={tmp_path / 'ckpt'}",
        "checkpoint.save_hf=true",
    )
    reference = train_with_reference(cfg, ids)
    converted = convert_checkpoint(tmp_path / "ckpt" / "iter_0000002", tmp_path / "converted")
    for folder in (converted, tmp_path / "ckpt" / "iter_0000002" / "hf"):
        wmap = weight_map(folder)
        assert set(wmap) == expected_keys(base)
        assert_released_layout(folder, base)
        if options.get("tie"):
            assert "lm_head.weight" not in wmap
        assert_same_logits(folder, reference, ids)
    if options.get("expert_bias"):
        _check_expert_bias(converted, base, reference, ids)
        _check_bf16_keeps_fp32_modules(convert_checkpoint(tmp_path / "ckpt", tmp_path / "bf16", dtype="bf16"))


def _check_expert_bias(folder: Path, base: Path, reference: torch.Tensor, ids: torch.Tensor) -> None:
    """The buffers are saved with their values, and they matter: zeroing them changes the logits."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder))
    original = AutoModelForCausalLM.from_pretrained(str(base))
    biases = {n: b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")}
    assert biases and all(b.abs().sum() > 0 for b in biases.values())
    for name, b in biases.items():
        assert torch.equal(b, dict(original.named_buffers())[name])  # a buffer: training leaves it alone
        b.zero_()
    with torch.no_grad():
        assert (model(input_ids=ids).logits - reference).abs().max() > 1e-3


def test_deepspeed_bf16_converts_the_fp32_master_weights(tmp_path, tiny_mixtral, tiny_dataset):
    """With DeepSpeed's own bf16 mode the module state is bf16; the fp32 masters in the ZeRO partitions are used."""
    ds_json = tmp_path / "ds.json"
    ds_json.write_text('{"bf16": {"enabled": true}}')
    cfg = make_config(
        tmp_path,
        tiny_mixtral,
        tiny_dataset,
        *SHORT,
        "eval.iters=0",  # the smallest run: bf16 is emulated (40-60x slower) on CPUs without bf16 units
        "data.seq_length=32",
        "train.global_batch_size=2",
        "distributed.zero_stage=2",
        f"checkpoint.save={tmp_path / 'ckpt'}",
        f"distributed.deepspeed_config={ds_json}",
    )
    assert train(cfg) == 0
    ckpt = tmp_path / "ckpt" / "iter_0000002"
    module = torch.load(ckpt / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert {t.dtype for t in module.values()} == {torch.bfloat16}
    out = convert_checkpoint(ckpt, tmp_path / "converted", dtype="fp32")
    converted = {}
    for shard in set(weight_map(out).values()):
        with safe_open(str(out / shard), "pt") as f:
            converted |= {k: f.get_tensor(k) for k in f.keys()}
    layout = model_layout(load_hf_config(Path(tiny_mixtral)), torch.bfloat16)
    bf16_files = {}  # the bf16 module state in the released layout, to compare file tensor by file tensor
    for spec in layout.specs:
        bf16_files |= layout.released.split(spec.name, module[f"model.{spec.name}"])
    assert bf16_files.keys() == converted.keys()
    more_precise = False
    for name, tensor in converted.items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor.to(torch.bfloat16), bf16_files[name]), name
        more_precise |= not torch.equal(tensor, tensor.to(torch.bfloat16).float())
    assert more_precise


def _check_bf16_keeps_fp32_modules(folder: Path) -> None:
    """DeepSeek-V3 keeps its router weight and correction bias in fp32 (`_keep_in_fp32_modules_strict`)."""
    dtypes = {}
    for shard in set(weight_map(folder).values()):
        with safe_open(str(folder / shard), "pt") as f:
            dtypes |= {k: f.get_tensor(k).dtype for k in f.keys()}
    fp32 = {k for k, d in dtypes.items() if d == torch.float32}
    assert fp32 == {k for k in dtypes if k.endswith((".e_score_correction_bias", ".mlp.gate.weight"))}
    assert fp32 and all(d == torch.bfloat16 for k, d in dtypes.items() if k not in fp32)
