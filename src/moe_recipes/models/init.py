"""`init-model`: write a randomly initialised model folder in Hugging Face format.

The folder holds ``config.json``, ``model.safetensors``, ``generation_config.json`` and the tokenizer, so
every other command (training, conversion, inference) and plain ``AutoModelForCausalLM.from_pretrained``
read it like any hub checkpoint. The vocabulary and the special-token ids come from the tokenizer, so
the embedding table always matches it.

Each family needs its config written in its own field names (``num_local_experts`` vs ``num_experts`` vs
``n_routed_experts``...): that is what ``ARCHITECTURES`` maps, and the only per-family knowledge here.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moe_recipes.fileio import publish, staging_dir

# torch dtype names; torch and transformers are imported where used, so that the command line (which reads
# ARCHITECTURES for `init-model --help`) stays light.
DTYPES: dict[str, str] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass(frozen=True)
class Dims:
    """Sizes asked for on the command line, already defaulted and validated."""

    hidden_size: int
    intermediate_size: int
    expert_intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    num_experts: int
    top_k: int
    num_shared_experts: int
    max_position_embeddings: int


@dataclass(frozen=True)
class ArchSpec:
    """How to write the config of one family: its ``model_type`` and its own field names."""

    model_type: str
    is_moe: bool
    build: Callable[[Dims], dict[str, Any]]
    default_shared_experts: int = 0
    min_shared_experts: int = 0
    max_shared_experts: int = 0


def _common(d: Dims) -> dict[str, Any]:
    return {
        "hidden_size": d.hidden_size,
        "num_hidden_layers": d.num_layers,
        "num_attention_heads": d.num_heads,
        "num_key_value_heads": d.num_kv_heads,
        "max_position_embeddings": d.max_position_embeddings,
        "tie_word_embeddings": False,
    }


def _dense(d: Dims) -> dict[str, Any]:
    return {**_common(d), "intermediate_size": d.intermediate_size}


def _mixtral(d: Dims) -> dict[str, Any]:
    return {
        **_common(d),
        "intermediate_size": d.expert_intermediate_size,
        "num_local_experts": d.num_experts,
        "num_experts_per_tok": d.top_k,
    }


def _olmoe(d: Dims) -> dict[str, Any]:
    return {
        **_common(d),
        "intermediate_size": d.expert_intermediate_size,
        "num_experts": d.num_experts,
        "num_experts_per_tok": d.top_k,
    }


def _qwen_moe(d: Dims) -> dict[str, Any]:
    return {
        **_common(d),
        "intermediate_size": d.intermediate_size,
        "moe_intermediate_size": d.expert_intermediate_size,
        "num_experts": d.num_experts,
        "num_experts_per_tok": d.top_k,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
    }


def _qwen2_moe(d: Dims) -> dict[str, Any]:
    # Qwen2-MoE's shared expert is one MLP as wide as `num_shared_experts` routed experts.
    return {
        **_qwen_moe(d),
        "shared_expert_intermediate_size": d.expert_intermediate_size * d.num_shared_experts,
    }


def _deepseek_groups(num_experts: int, top_k: int) -> tuple[int, int]:
    """(n_group, topk_group) for group-limited routing: 2 groups when each can hold >= 2 experts.

    HF scores a group by its top-2 experts, so a group needs at least 2; enough groups are kept for
    ``top_k`` experts to be selectable.
    """
    n_group = 2 if num_experts % 2 == 0 and num_experts >= 4 else 1
    topk_group = min(n_group, math.ceil(top_k / (num_experts // n_group)))
    return n_group, topk_group


def _deepseek_v3(d: Dims) -> dict[str, Any]:
    head_dim = d.hidden_size // d.num_heads
    n_group, topk_group = _deepseek_groups(d.num_experts, d.top_k)
    return {
        **_common(d),
        "num_key_value_heads": d.num_heads,  # MLA: every head has its own (decompressed) K/V
        "intermediate_size": d.intermediate_size,
        "moe_intermediate_size": d.expert_intermediate_size,
        "n_routed_experts": d.num_experts,
        "num_experts_per_tok": d.top_k,
        "n_shared_experts": d.num_shared_experts,
        "q_lora_rank": max(16, d.hidden_size // 2),
        "kv_lora_rank": max(16, d.hidden_size // 4),
        "qk_nope_head_dim": head_dim,
        "qk_rope_head_dim": max(8, head_dim // 2),
        "v_head_dim": head_dim,
        "n_group": n_group,
        "topk_group": topk_group,
        # One dense layer first (as in the real model) when there is room for an MoE layer after it.
        "first_k_dense_replace": 1 if d.num_layers > 1 else 0,
        "num_nextn_predict_layers": 0,  # HF does not build the MTP layers
    }


ARCHITECTURES: dict[str, ArchSpec] = {
    "mixtral": ArchSpec("mixtral", True, _mixtral),
    "qwen2_moe": ArchSpec("qwen2_moe", True, _qwen2_moe, 1, 1, 64),
    "qwen3_moe": ArchSpec("qwen3_moe", True, _qwen_moe),
    "deepseek_v3": ArchSpec("deepseek_v3", True, _deepseek_v3, 1, 1, 64),
    "olmoe": ArchSpec("olmoe", True, _olmoe),
    "llama": ArchSpec("llama", False, _dense),
    "qwen2": ArchSpec("qwen2", False, _dense),
}


def _positive(**values: int) -> None:
    for key, value in values.items():
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"init-model: {key} must be a positive integer, got {value!r}")


def make_dims(
    arch: str,
    hidden_size: int = 128,
    intermediate_size: int | None = None,
    expert_intermediate_size: int | None = None,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    num_experts: int = 8,
    top_k: int = 2,
    num_shared_experts: int | None = None,
    max_position_embeddings: int = 4096,
) -> Dims:
    """Fill in defaults and check the sizes fit together, naming the offending argument.

    Defaults: ``intermediate_size`` (dense MLP width) = 2 x hidden; ``expert_intermediate_size`` (each
    routed expert's width) = hidden; ``num_kv_heads`` = ``num_heads``; shared experts = the family's
    usual count (1 for qwen2_moe and deepseek_v3, none elsewhere).
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"init-model: arch {arch!r} is not one of {sorted(ARCHITECTURES)}")
    spec = ARCHITECTURES[arch]
    intermediate_size = intermediate_size or 2 * hidden_size
    expert_intermediate_size = expert_intermediate_size or hidden_size
    num_kv_heads = num_kv_heads or num_heads
    shared = spec.default_shared_experts if num_shared_experts is None else num_shared_experts
    _positive(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        expert_intermediate_size=expert_intermediate_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        num_experts=num_experts,
        top_k=top_k,
        max_position_embeddings=max_position_embeddings,
    )
    if hidden_size % num_heads:
        raise ValueError(f"init-model: hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
    if num_heads % num_kv_heads:
        raise ValueError(f"init-model: num_heads={num_heads} is not divisible by num_kv_heads={num_kv_heads}")
    if spec.is_moe and top_k > num_experts:
        raise ValueError(f"init-model: top_k={top_k} is larger than num_experts={num_experts}")
    if spec.is_moe and not spec.min_shared_experts <= shared <= spec.max_shared_experts:
        raise ValueError(
            f"init-model: num_shared_experts={shared} is not supported by {arch} "
            f"(allowed {spec.min_shared_experts}..{spec.max_shared_experts})"
        )
    return Dims(
        hidden_size,
        intermediate_size,
        expert_intermediate_size,
        num_layers,
        num_heads,
        num_kv_heads,
        num_experts,
        top_k,
        shared if spec.is_moe else 0,
        max_position_embeddings,
    )


def build_config(
    arch: str,
    dims: Dims,
    *,
    vocab_size: int,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    dtype: str = "fp32",
) -> Any:
    """The HF config of ``arch`` with the given sizes, vocabulary and special-token ids."""
    spec = ARCHITECTURES[arch]
    from transformers import AutoConfig

    return AutoConfig.for_model(
        spec.model_type,
        **spec.build(dims),
        vocab_size=vocab_size,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        dtype=DTYPES[dtype],
    )


def _check_output_dir(output_dir: Path, overwrite: bool) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"init-model: output_dir {output_dir} exists and is not a directory")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise ValueError(f"init-model: output_dir {output_dir} exists and is not empty (pass overwrite=True)")


def _save_atomically(model: Any, tokenizer: Any, out: Path) -> None:
    """Save model + tokenizer into a temporary sibling of ``out``, then rename it into place."""
    tmp_dir = staging_dir(out)
    try:
        model.save_pretrained(str(tmp_dir))
        tokenizer.save_pretrained(str(tmp_dir))
        publish(tmp_dir, out)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise


def init_model(
    arch: str,
    tokenizer_dir: str,
    output_dir: str,
    hidden_size: int = 128,
    intermediate_size: int | None = None,
    expert_intermediate_size: int | None = None,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    num_experts: int = 8,
    top_k: int = 2,
    num_shared_experts: int | None = None,
    max_position_embeddings: int = 4096,
    seed: int = 0,
    dtype: str = "fp32",
    overwrite: bool = False,
    device: str = "cpu",
) -> str:
    """Build a random ``arch`` model sized as asked and save it with its tokenizer; return the folder.

    The folder is written to a temporary sibling and renamed into place, so a crash never leaves a
    half-written model behind. ``num_experts``/``top_k`` are ignored for dense families (llama, qwen2).
    ``device`` is where the weights are built and initialised: ``"cuda"`` makes a multi-billion-parameter
    model in seconds instead of minutes, with different (equally random) values for the same seed.
    """
    if dtype not in DTYPES:
        raise ValueError(f"init-model: dtype {dtype!r} is not one of {sorted(DTYPES)}")
    tokenizer_path = Path(tokenizer_dir)
    if not tokenizer_path.is_dir():
        raise FileNotFoundError(f"init-model: tokenizer_dir {tokenizer_path} is not a directory")
    dims = make_dims(
        arch,
        hidden_size,
        intermediate_size,
        expert_intermediate_size,
        num_layers,
        num_heads,
        num_kv_heads,
        num_experts,
        top_k,
        num_shared_experts,
        max_position_embeddings,
    )
    out = Path(output_dir).resolve()
    _check_output_dir(out, overwrite)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path))
    # A tokenizer without a pad token leaves pad_token_id unset rather than borrowing EOS: HF uses it as
    # the embedding padding_idx, which would freeze the EOS embedding at zero.
    config = build_config(
        arch,
        dims,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype=dtype,
    )
    where = torch.device(device)
    # seed the init without touching the caller's RNG (of the CPU, and of the device when it is one)
    forked = [] if where.type == "cpu" else [where.index or 0]
    with torch.random.fork_rng(devices=forked, device_type=where.type), where:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config).to(getattr(torch, DTYPES[dtype]))
    _save_atomically(model, tokenizer, out)
    return str(out)
