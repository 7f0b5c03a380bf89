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

Streaming: the MoE model is built on the ``meta`` device only for its layout (names, shapes, the released file
names of ``hf_folder.layout_of``); each of its tensors is then made on demand, straight from the dense
checkpoint read lazily by name, and written shard by shard (``hf_folder.write_weights``). Nothing is
initialised and then overwritten, and memory holds the dense tensors being read, one MoE tensor and one shard.
The output keeps the dense checkpoint's dtype. Every random draw (each expert's dropped neurons and their new
values, each router) comes from its own generator seeded from (seed, layer, expert, what), so the weights
depend on the seed alone, not on the shard size or the order in which tensors are written.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from moe_recipes.convert.sources import state_dict_source
from moe_recipes.hf_folder import (
    ModelLayout,
    TensorSpec,
    config_dtype,
    copy_side_files,
    layout_of,
    parse_size,
    publish,
    staging_dir,
    write_weights,
)
from moe_recipes.models.inspect import inspect_model
from moe_recipes.models.upcycle_cli import DEFAULT_MAX_SHARD_SIZE
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


class DenseWeights(Protocol):
    """Named dense tensors read on demand (`convert.sources.FileSource` reads a checkpoint folder lazily)."""

    def keys(self) -> list[str]: ...
    def shape(self, key: str) -> tuple[int, ...]: ...
    def get(self, key: str) -> torch.Tensor: ...


def generator(seed: int, *key: int | str) -> torch.Generator:
    """A generator for one draw, seeded from (seed, *key) by SHA-256 (not Python's salted `hash`)."""
    digest = hashlib.sha256(repr((seed, *key)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _redraw(weight: torch.Tensor, index: torch.Tensor, dim: int, gen: torch.Generator) -> torch.Tensor:
    """``weight`` (fp32) with the rows (dim 0) or columns (dim 1) in ``index`` drawn from N(mean, std) of it."""
    if not len(index):
        return weight
    out = weight.clone()
    shape = (len(index), weight.shape[1]) if dim == 0 else (weight.shape[0], len(index))
    fresh = torch.randn(shape, generator=gen, dtype=torch.float32) * weight.std() + weight.mean()
    out.index_copy_(dim, index, fresh)
    return out


class Upcycler:
    """Makes each tensor of the MoE model `moe` (on meta: only its layout is used) from the dense weights."""

    def __init__(
        self, dense: DenseWeights, moe: Any, layout: ModelLayout, drop_ratio: float, seed: int, std: float
    ):
        if not 0.0 <= drop_ratio <= 1.0:
            raise ValueError(f"upcycle: --drop-ratio must be in [0, 1], got {drop_ratio}")
        self.dense, self.drop_ratio, self.seed, self.std = dense, drop_ratio, seed, std
        info = inspect_model(moe)
        if len(info.moe_blocks) != moe.config.num_hidden_layers:
            raise ValueError(
                f"upcycle: expected an MoE block in each of {moe.config.num_hidden_layers} layers"
            )
        # in-memory MoE name -> how to make it, for every tensor inside an MoE block
        self.makers: dict[str, Callable[[TensorSpec], torch.Tensor]] = {}
        for layer, ((block, _), (router, _)) in enumerate(zip(info.moe_blocks, info.routers, strict=True)):
            self._plan_block(layer, block, router, layout)
        self._check_names(layout, [f"{block}." for block, _ in info.moe_blocks])

    def __call__(self, spec: TensorSpec) -> torch.Tensor:
        """The MoE tensor `spec`, in the spec's dtype."""
        make = self.makers.get(spec.name)
        out = make(spec) if make else self.dense.get(spec.name)
        return out.to(spec.dtype)

    def _plan_block(self, layer: int, block: str, router: str, layout: ModelLayout) -> None:
        mlp = tuple(f"{block}.{proj}.weight" for proj in ("gate_proj", "up_proj", "down_proj"))
        keys = set(self.dense.keys())
        if not all(k in keys for k in mlp):
            raise ValueError(
                f"upcycle: the dense model has no gated MLP (gate_proj/up_proj/down_proj) at {block}"
            )
        names = {spec.name for spec in layout.specs if spec.name.startswith(f"{block}.")}
        shared = f"{block}.shared_expert_gate.weight" in names
        scale = 0.5 if shared else 1.0  # 1/2 routed + 1/2 shared = the dense MLP
        self.makers[f"{router}.weight"] = lambda spec: self._router(spec, layer)
        self.makers[f"{block}.experts.gate_up_proj"] = lambda spec: self._gate_up(spec, layer, mlp)
        self.makers[f"{block}.experts.down_proj"] = lambda spec: self._down(spec, layer, mlp[2], scale)
        if shared:
            for proj, key in zip(("gate_proj", "up_proj", "down_proj"), mlp, strict=True):
                self.makers[f"{block}.shared_expert.{proj}.weight"] = lambda spec, key=key: self.dense.get(
                    key
                )
            self.makers[f"{block}.shared_expert_gate.weight"] = lambda spec: torch.zeros(spec.shape)
        unknown = sorted(names - set(self.makers))
        if unknown:
            raise ValueError(f"upcycle: do not know how to make {unknown[:4]} from a dense MLP")

    def _check_names(self, layout: ModelLayout, block_prefixes: list[str]) -> None:
        """Every non-MLP tensor is copied by name; anything without a counterpart is an error."""
        in_block = lambda key: any(key.startswith(p) for p in block_prefixes)  # noqa: E731
        dense = set(self.dense.keys())
        missing = [
            s.name
            for s in layout.specs
            if not in_block(s.name) and (s.name not in dense or self.dense.shape(s.name) != s.shape)
        ]
        moe_names = {s.name for s in layout.specs} | set(layout.tied)
        unused = [k for k in self.dense.keys() if not in_block(k) and k not in moe_names]
        if missing or unused:
            raise ValueError(
                f"upcycle: the dense model does not map onto {layout.config.model_type}: "
                f"weights without a dense counterpart {missing[:4]}, dense weights with no place {unused[:4]}"
            )

    def _router(self, spec: TensorSpec, layer: int) -> torch.Tensor:
        return torch.randn(spec.shape, generator=generator(self.seed, layer, "router")) * self.std

    def _neurons(self, layer: int, expert: int, width: int) -> torch.Tensor:
        """The intermediate neurons expert `expert` of `layer` re-draws (the same for gate, up and down)."""
        n_drop = round(self.drop_ratio * width)
        if not n_drop:
            return torch.empty(0, dtype=torch.long)
        return torch.randperm(width, generator=generator(self.seed, layer, expert, "neurons"))[:n_drop]

    def _gate_up(self, spec: TensorSpec, layer: int, mlp: tuple[str, ...]) -> torch.Tensor:
        """Fused ``gate_up_proj (E, 2I, H)``: every expert's [gate; up] rows, its dropped rows re-drawn."""
        gate, up = self.dense.get(mlp[0]).float(), self.dense.get(mlp[1]).float()  # (I, H) each
        num_experts, width = spec.shape[0], gate.shape[0]
        if spec.shape[1:] != (2 * width, gate.shape[1]) or up.shape != gate.shape:
            raise ValueError(
                f"upcycle: expert shape {spec.shape} does not fit the dense MLP {tuple(gate.shape)}"
            )
        out = torch.empty(spec.shape, dtype=spec.dtype)
        for e in range(num_experts):
            index = self._neurons(layer, e, width)
            out[e, :width] = _redraw(gate, index, 0, generator(self.seed, layer, e, "gate"))
            out[e, width:] = _redraw(up, index, 0, generator(self.seed, layer, e, "up"))
        return out

    def _down(self, spec: TensorSpec, layer: int, key: str, scale: float) -> torch.Tensor:
        """Fused ``down_proj (E, H, I)``: every expert's down projection, its dropped columns re-drawn."""
        down = self.dense.get(key).float()  # (H, I)
        if spec.shape[1:] != tuple(down.shape):
            raise ValueError(
                f"upcycle: expert shape {spec.shape} does not fit the dense MLP {tuple(down.shape)}"
            )
        out = torch.empty(spec.shape, dtype=spec.dtype)
        for e in range(spec.shape[0]):
            index = self._neurons(layer, e, down.shape[1])
            out[e] = _redraw(down, index, 1, generator(self.seed, layer, e, "down")) * scale
        return out


def upcycle(
    dense_dir: str,
    arch: str,
    experts: int,
    top_k: int,
    output_dir: str,
    drop_ratio: float = 0.0,
    seed: int = 0,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """Upcycle the dense HF folder into an MoE folder (the dense dtype, the released layout), streaming."""
    src, out = Path(dense_dir), Path(output_dir)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(
            f"upcycle: {src / 'config.json'} not found (--dense must be a HF model folder)"
        )
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"upcycle: --output {out} exists and is not empty")
    max_bytes = parse_size(max_shard_size)
    dense_config = AutoConfig.from_pretrained(str(src))
    config = moe_config(dense_config, arch, experts, top_k)
    dense = state_dict_source(src, reopen=True)  # each dense tensor is read once
    with torch.device("meta"):
        if inspect_model(AutoModelForCausalLM.from_config(dense_config)).is_moe:
            raise ValueError(f"upcycle: {src} is already an MoE model")
        moe = AutoModelForCausalLM.from_config(config)
    dtype = config_dtype(src)
    layout = layout_of(moe, dtype)
    std = float(getattr(dense_config, "initializer_range", 0.02))
    make = Upcycler(dense, moe, layout, drop_ratio, seed, std)
    tmp = staging_dir(out)
    try:
        write_weights(tmp, layout, make, max_bytes, "upcycle")
        config.architectures = [type(moe).__name__]
        config.dtype = dtype
        config.save_pretrained(str(tmp))
        copy_side_files(src, tmp, config)
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
