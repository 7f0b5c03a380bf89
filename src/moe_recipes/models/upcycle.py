"""`moe-recipes upcycle`: turn a dense Hugging Face model into an MoE one (sparse upcycling, Drop-Upcycling).

Every routed expert starts as a copy of the dense layer's MLP (Komatsuzaki et al. 2023). With a drop
ratio ``R`` (Drop-Upcycling, Nakamura et al. 2025) each expert re-initialises its own random ``R`` share of
intermediate neurons (rows of the gate/up projections, columns of the down projection) from a normal
distribution with the mean and standard deviation of the original matrix, so experts start different and
specialise faster. Routers start small (normal, std = the dense config's ``initializer_range``).

Function preservation: the MoE families here renormalise the selected top-k weights to sum to 1
(``norm_topk_prob=True`` is set for Qwen), so with ``R = 0`` every token gets ``sum_k w_k * MLP(x) = MLP(x)``
and the upcycled model's logits equal the dense model's. Qwen2-MoE's shared expert is gated by
``sigmoid(gate(x))``, which cannot start at 0; so its gate starts at zero weights (``sigmoid = 1/2``), the
shared expert is an exact copy of the MLP, and the routed experts' down projections are halved:
``1/2 MLP + 1/2 MLP = MLP``. The drop ratio applies to routed experts only.

Everything outside the MLPs (embeddings, attention, norms, LM head) is copied by name; a weight the MoE
family has and the dense model lacks (e.g. Qwen3-MoE's query/key norms from a Llama) or the reverse (Qwen2's
attention biases into Mixtral) is an error, since the result could not match the dense model.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from moe_recipes.models.inspect import inspect_model
from moe_recipes.models.upcycle_cli import UPCYCLE_ARCHS as ARCHS

_COPIED_KEYS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_parameters",
    "tie_word_embeddings",
    "attention_dropout",
    "initializer_range",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)
_EXTRA_FILES = ("generation_config.json", "chat_template.jinja", "special_tokens_map.json")


def moe_config(dense: Any, arch: str, experts: int, top_k: int) -> Any:
    """The ``arch`` config with the dense model's sizes, ``experts`` routed experts of its MLP width."""
    if arch not in ARCHS:
        raise ValueError(f"upcycle: --arch {arch!r} is not one of {', '.join(ARCHS)}")
    if experts < 1 or not 1 <= top_k <= experts:
        raise ValueError(f"upcycle: need --experts >= 1 and 1 <= --top-k <= experts, got {experts}, {top_k}")
    kw: dict[str, Any] = {k: getattr(dense, k) for k in _COPIED_KEYS if getattr(dense, k, None) is not None}
    width = dense.intermediate_size
    head_dim = getattr(dense, "head_dim", None)
    if head_dim is not None:
        kw["head_dim"] = head_dim
    if getattr(dense, "sliding_window", None) and getattr(dense, "use_sliding_window", True):
        kw["sliding_window"] = dense.sliding_window
    kw["num_experts_per_tok"] = top_k
    if arch == "mixtral":
        kw.update(num_local_experts=experts, intermediate_size=width)
    else:
        common = {"moe_intermediate_size": width, "intermediate_size": width, "norm_topk_prob": True}
        kw.update(common, decoder_sparse_step=1, mlp_only_layers=[])
        if arch == "qwen2_moe":
            kw.update(
                num_experts=experts, shared_expert_intermediate_size=width, qkv_bias=_has_qkv_bias(dense)
            )
        else:
            kw.update(num_local_experts=experts, attention_bias=bool(getattr(dense, "attention_bias", False)))
    return AutoConfig.for_model(arch, **kw)


def _has_qkv_bias(dense: Any) -> bool:
    """Qwen2 always has q/k/v biases; Llama/Mistral-style models say so in ``attention_bias``."""
    return dense.model_type == "qwen2" or bool(getattr(dense, "attention_bias", False))


def _mlp_weights(dense: nn.Module, block_name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gate (I, H), up (I, H), down (H, I)) of the dense MLP at the MoE block's position."""
    try:
        mlp = dense.get_submodule(block_name)
        return mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    except AttributeError as err:
        raise ValueError(
            f"upcycle: the dense model has no gated MLP (gate_proj/up_proj/down_proj) at {block_name}"
        ) from err


def _redraw(weight: torch.Tensor, index: torch.Tensor, dim: int, gen: torch.Generator) -> torch.Tensor:
    """``weight`` with the rows (dim 0) or columns (dim 1) in ``index`` drawn from N(mean, std) of ``weight``."""
    out = weight.clone()
    shape = (len(index), weight.shape[1]) if dim == 0 else (weight.shape[0], len(index))
    fresh = (
        torch.randn(shape, generator=gen, dtype=torch.float32) * weight.float().std() + weight.float().mean()
    )
    out.index_copy_(dim, index, fresh.to(weight.dtype))
    return out


def _fill_experts(
    experts: nn.Module, mlp: tuple[torch.Tensor, ...], drop_ratio: float, scale: float, gen: torch.Generator
) -> None:
    """Copy the dense MLP into every expert of the fused ``gate_up_proj (E, 2I, H)`` / ``down_proj (E, H, I)``."""
    gate, up, down = mlp
    num_experts, width = experts.down_proj.shape[0], gate.shape[0]
    if experts.gate_up_proj.shape[1:] != (2 * width, gate.shape[1]):
        raise ValueError(
            f"upcycle: expert shape {tuple(experts.gate_up_proj.shape)} does not fit the dense MLP"
        )
    n_drop = round(drop_ratio * width)
    for e in range(num_experts):
        g, u, d = gate, up, down
        if n_drop:
            index = torch.randperm(width, generator=gen)[:n_drop]  # this expert's own neurons
            g, u, d = _redraw(g, index, 0, gen), _redraw(u, index, 0, gen), _redraw(d, index, 1, gen)
        experts.gate_up_proj[e].copy_(torch.cat([g, u], dim=0))
        experts.down_proj[e].copy_(d * scale)


def _copy_shared_weights(dense: nn.Module, moe: nn.Module, block_prefixes: list[str]) -> None:
    """Copy every non-MLP tensor by name; anything without a counterpart is an error."""
    dense_sd, moe_sd = dense.state_dict(), moe.state_dict()
    in_block = lambda key: any(key.startswith(p) for p in block_prefixes)  # noqa: E731
    missing = [
        k for k in moe_sd if not in_block(k) and (k not in dense_sd or dense_sd[k].shape != moe_sd[k].shape)
    ]
    unused = [k for k in dense_sd if not in_block(k) and k not in moe_sd]
    if missing or unused:
        raise ValueError(
            f"upcycle: the dense model does not map onto {moe.config.model_type}: "
            f"weights without a dense counterpart {missing[:4]}, dense weights with no place {unused[:4]}"
        )
    with torch.no_grad():
        for key, value in moe_sd.items():
            if not in_block(key):
                value.copy_(dense_sd[key])


@torch.no_grad()
def upcycle_model(
    dense: nn.Module, arch: str, experts: int, top_k: int, drop_ratio: float = 0.0, seed: int = 0
) -> nn.Module:
    """The MoE model (fp32) built from ``dense`` as the module docstring describes."""
    if not 0.0 <= drop_ratio <= 1.0:
        raise ValueError(f"upcycle: --drop-ratio must be in [0, 1], got {drop_ratio}")
    config = moe_config(dense.config, arch, experts, top_k)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        moe = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    info = inspect_model(moe)
    blocks = info.moe_blocks
    if len(blocks) != config.num_hidden_layers:
        raise ValueError(f"upcycle: expected an MoE block in each of {config.num_hidden_layers} layers")
    _copy_shared_weights(dense, moe, [f"{name}." for name, _ in blocks])
    std = float(getattr(dense.config, "initializer_range", 0.02))
    for (name, block), (_, router) in zip(blocks, info.routers, strict=True):
        mlp = tuple(w.float() for w in _mlp_weights(dense, name))
        shared = getattr(block, "shared_expert", None)
        _fill_experts(block.experts, mlp, drop_ratio, 0.5 if shared is not None else 1.0, gen)
        router.weight.copy_(torch.randn(router.weight.shape, generator=gen) * std)
        if shared is not None:
            for proj, weight in zip(("gate_proj", "up_proj", "down_proj"), mlp):
                getattr(shared, proj).weight.copy_(weight)
            block.shared_expert_gate.weight.zero_()
    return moe


def upcycle(
    dense_dir: str,
    arch: str,
    experts: int,
    top_k: int,
    output_dir: str,
    drop_ratio: float = 0.0,
    seed: int = 0,
) -> Path:
    """Read the dense HF folder, upcycle it, write the MoE folder (dense dtype, tokenizer files copied)."""
    src, out = Path(dense_dir), Path(output_dir)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(
            f"upcycle: {src / 'config.json'} not found (--dense must be a HF model folder)"
        )
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"upcycle: --output {out} exists and is not empty")
    dense = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    if inspect_model(dense).is_moe:
        raise ValueError(f"upcycle: {src} is already an MoE model")
    moe = upcycle_model(dense, arch, experts, top_k, drop_ratio, seed)
    dtype = getattr(dense.config, "dtype", None)
    if isinstance(dtype, torch.dtype) and dtype != torch.float32:
        moe = moe.to(dtype)
    moe.save_pretrained(str(out))
    for path in src.iterdir():
        if path.name.startswith("tokenizer") or path.name in _EXTRA_FILES:
            shutil.copy2(path, out / path.name)
    return out
