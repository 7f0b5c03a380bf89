"""Find the MoE parts of a Hugging Face model from its module tree, count its parameters and FLOPs.

Nothing here matches model names. Everything is read from what transformers already declares:

* decoder layers: the class names in ``PreTrainedModel._no_split_modules`` (the unit HF never splits
  across devices is exactly the unit to checkpoint / shard), resolved against the live module tree;
* routers: ``PreTrainedModel._can_record_outputs["router_logits"]`` names the router class (and which
  element of its output tuple holds the logits); models that declare nothing fall back to the structure
  "a module with 3-D (fused expert) parameters next to a module whose weight is ``(num_experts, hidden)``";
* MoE blocks: the parents of the routers; routed experts: the modules in a block that own 3-D params;
  shared experts: the block's other children that hold parameters.

``RouterCapture`` records each router call (logits and selected experts) of a forward pass so the trainer
can compute auxiliary losses and expert-load statistics without ``output_router_logits``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer


@dataclass
class MoEInfo:
    """What a model's module tree says about its MoE structure.

    ``num_shared_experts`` is measured in routed-expert units (shared-expert parameters / parameters of one
    routed expert, rounded), which is how DeepSeek's ``n_shared_experts`` counts them and how Qwen2-MoE's
    wide shared expert compares with its routed ones.
    """

    decoder_layer_classes: set[type]
    moe_block_classes: set[type]
    router_class: type | None
    routers: list[tuple[str, nn.Module]]
    num_experts: int
    top_k: int
    num_shared_experts: int
    router_logits_index: int = 0
    moe_blocks: list[tuple[str, nn.Module]] = field(default_factory=list)

    @property
    def is_moe(self) -> bool:
        """True when the model has at least one router."""
        return bool(self.routers)


def _numel(p: Tensor) -> int:
    """Full element count of a parameter, also when DeepSpeed ZeRO-3 has partitioned it away."""
    return int(getattr(p, "ds_numel", p.numel()))


def _shape(p: Tensor) -> torch.Size:
    """Full shape of a parameter, also when DeepSpeed ZeRO-3 has partitioned it (local shape is (0,))."""
    return getattr(p, "ds_shape", p.shape)


def _pretrained_modules(model: nn.Module) -> list[PreTrainedModel]:
    """The model and every nested ``PreTrainedModel`` (multimodal wrappers hold text models inside)."""
    return [m for m in model.modules() if isinstance(m, PreTrainedModel)]


def _router_recorders(model: nn.Module) -> list[tuple[type | str, int]]:
    """(router class or class name, index of the logits in its output) declared by the model classes."""
    found: list[tuple[type | str, int]] = []
    for sub in _pretrained_modules(model):
        spec = (getattr(type(sub), "_can_record_outputs", None) or {}).get("router_logits")
        entries = spec if isinstance(spec, (list, tuple)) else [spec]
        for entry in entries:
            if entry is None:
                continue
            if isinstance(entry, (type, str)):
                # HF's convention for a bare class/name under a non-"hidden_states" key is output index 1.
                found.append((entry, 1))
            else:
                target = getattr(entry, "target_class", None) or getattr(entry, "class_name", None)
                if target is not None:
                    found.append((target, int(getattr(entry, "index", 0) or 0)))
    return found


def _matches(module: nn.Module, target: type | str) -> bool:
    """Whether ``module`` is an instance of ``target`` (a class, or a class name / name suffix)."""
    if isinstance(target, type):
        return isinstance(module, target)
    return type(module).__name__.endswith(target)


def _owns_3d_params(module: nn.Module) -> bool:
    """Fused expert weights are the only 3-D parameters in a transformer: ``(experts, out, in)``."""
    return any(len(_shape(p)) == 3 for p in module.parameters(recurse=False))


def _routers_from_structure(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Routers found without any declaration: a sibling of a fused-experts module with weight ``(E, H)``."""
    routers: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()
    for name, module in model.named_modules():
        children = list(module.named_children())
        experts = [c for _, c in children if _owns_3d_params(c)]
        if not experts:
            continue
        num_experts = next(_shape(p)[0] for p in experts[0].parameters(recurse=False) if len(_shape(p)) == 3)
        for child_name, child in children:
            weight = getattr(child, "weight", None)
            if (
                id(child) not in seen
                and isinstance(weight, Tensor)
                and len(_shape(weight)) == 2
                and _shape(weight)[0] == num_experts
                and not any(child is e for e in experts)
            ):
                seen.add(id(child))
                routers.append((f"{name}.{child_name}" if name else child_name, child))
    return routers


def _find_routers(model: nn.Module) -> tuple[list[tuple[str, nn.Module]], int]:
    """Routers in module (= layer) order and the output index of their logits."""
    for target, index in _router_recorders(model):
        routers = [(n, m) for n, m in model.named_modules() if _matches(m, target)]
        if routers:
            return routers, index
    return _routers_from_structure(model), 0


def _decoder_layer_classes(model: nn.Module) -> set[type]:
    """Classes named in ``_no_split_modules`` that occur in the tree; else HF's checkpointable layers."""
    names: set[str] = set()
    for sub in _pretrained_modules(model):
        names.update(getattr(sub, "_no_split_modules", None) or [])
    classes = {type(m) for m in model.modules() if type(m).__name__ in names}
    if not classes:
        classes = {type(m) for m in model.modules() if isinstance(m, GradientCheckpointingLayer)}
    return classes


def _parent_of(model: nn.Module, qualified_name: str) -> tuple[str, nn.Module]:
    """(name, module) of the parent of the module called ``qualified_name``."""
    parent_name = qualified_name.rpartition(".")[0]
    return parent_name, (model.get_submodule(parent_name) if parent_name else model)


def _expert_modules(block: nn.Module) -> list[nn.Module]:
    """Modules in an MoE block that own fused (3-D) expert parameters."""
    return [m for m in block.modules() if _owns_3d_params(m)]


def _shared_modules(block: nn.Module, router: nn.Module) -> list[nn.Module]:
    """Children of an MoE block that are neither the router nor (contain) routed experts."""
    out = []
    for child in block.children():
        if child is router or any(_owns_3d_params(m) for m in child.modules()):
            continue
        if any(True for _ in child.parameters()):
            out.append(child)
    return out


def _unique_params(modules: list[nn.Module], recurse: bool = True) -> list[Tensor]:
    """Parameters of several modules, each counted once."""
    seen: dict[int, Tensor] = {}
    for module in modules:
        for p in module.parameters(recurse=recurse):
            seen.setdefault(id(p), p)
    return list(seen.values())


def _router_fanout(model: nn.Module, routers: list[tuple[str, nn.Module]]) -> tuple[int, int]:
    """(num_experts, top_k) read from the routers; all routers must agree."""
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if config is not None else None
    pairs = set()
    for name, router in routers:
        num_experts = getattr(router, "num_experts", None) or _shape(router.weight)[0]
        top_k = getattr(router, "top_k", None) or getattr(text_config, "num_experts_per_tok", None)
        if top_k is None:
            raise ValueError(
                f"router {name}: cannot tell top_k (no .top_k and no config.num_experts_per_tok)"
            )
        pairs.add((int(num_experts), int(top_k)))
    if len(pairs) != 1:
        raise ValueError(f"routers disagree on (num_experts, top_k): {sorted(pairs)}")
    return pairs.pop()


def inspect_model(model: nn.Module) -> MoEInfo:
    """Describe the decoder layers, MoE blocks and routers of ``model`` from its module tree.

    Dense models come back with no routers, no MoE blocks and zero expert counts. Call it on the
    unwrapped model, before FSDP/ZeRO wrap it (FSDP2 renames the layer classes it shards).
    """
    routers, logits_index = _find_routers(model)
    layer_classes = _decoder_layer_classes(model)
    if not routers:
        return MoEInfo(layer_classes, set(), None, [], 0, 0, 0)
    num_experts, top_k = _router_fanout(model, routers)
    blocks = [_parent_of(model, name) for name, _ in routers]
    name0, block0 = blocks[0]
    routed = sum(_numel(p) for p in _unique_params(_expert_modules(block0), recurse=False))
    shared = sum(_numel(p) for p in _unique_params(_shared_modules(block0, routers[0][1])))
    per_expert = routed / num_experts if routed else 0.0
    num_shared = round(shared / per_expert) if per_expert else 0
    return MoEInfo(
        decoder_layer_classes=layer_classes,
        moe_block_classes={type(b) for _, b in blocks},
        router_class=type(routers[0][1]),
        routers=routers,
        num_experts=num_experts,
        top_k=top_k,
        num_shared_experts=num_shared,
        router_logits_index=logits_index,
        moe_blocks=blocks,
    )


def count_parameters(model: nn.Module, info: MoEInfo | None = None) -> dict[str, int]:
    """Parameter counts for logging and MFU.

    Returns ``total`` (unique parameters), ``embedding`` (input embedding table), ``routed_experts`` (all
    fused expert parameters), ``shared_experts``, ``active`` (what one token touches: everything except the
    routed experts, plus ``top_k / num_experts`` of them) and ``active_non_embedding`` (``active`` minus the
    embedding table; the LM head stays in, it is a real matmul).
    """
    info = info if info is not None else inspect_model(model)
    total = sum(_numel(p) for p in _unique_params([model]))
    embedding_module = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    embedding = _numel(embedding_module.weight) if embedding_module is not None else 0
    routed = 0
    shared = 0
    if info.is_moe:
        blocks = [b for _, b in info.moe_blocks]
        routed = sum(
            _numel(p) for p in _unique_params([m for b in blocks for m in _expert_modules(b)], False)
        )
        shared_mods = [
            m for (_, b), (_, r) in zip(info.moe_blocks, info.routers) for m in _shared_modules(b, r)
        ]
        shared = sum(_numel(p) for p in _unique_params(shared_mods))
    active_routed = routed * info.top_k // info.num_experts if info.num_experts else 0
    active = total - routed + active_routed
    return {
        "total": total,
        "embedding": embedding,
        "routed_experts": routed,
        "shared_experts": shared,
        "active": active,
        "active_non_embedding": active - embedding,
    }


def _attention_dims(config: Any) -> tuple[int, int, int, int]:
    """(layers, heads, query/key head dim, value head dim) of a text config; MLA has qk != v dims."""
    heads = int(config.num_attention_heads)
    default_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    qk_dim = getattr(config, "qk_head_dim", None) or default_dim
    v_dim = getattr(config, "v_head_dim", None) or default_dim
    return int(config.num_hidden_layers), heads, int(qk_dim), int(v_dim)


def flops_per_token(model: nn.Module, seq_length: int, info: MoEInfo | None = None) -> float:
    """Training FLOPs per token (forward + backward) for MFU.

    Formula (PaLM appendix B, extended to MoE and to MLA's different q/k and v head dims)::

        6 * N_active + 6 * L * T * heads * (d_qk + d_v)

    ``N_active`` = ``count_parameters()["active_non_embedding"]`` (+ the LM head when it is tied to the
    embedding, since the matmul still runs); 6 = 2 FLOPs per multiply-add x (1 forward + 2 backward).
    The second term is ``QK^T`` and ``AV`` (2 * T * heads * d each per layer, forward), times 3 for training,
    with ``T = seq_length``. Like PaLM it does not halve for the causal mask and ignores sliding windows, so
    it is the dense-attention upper bound used by most MFU reports.
    """
    counts = count_parameters(model, info)
    dense = counts["active_non_embedding"]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if head is not None and embed is not None and head.weight is embed.weight:
        dense += _numel(head.weight)
    layers, heads, qk_dim, v_dim = _attention_dims(model.config.get_text_config())
    return 6.0 * dense + 6.0 * layers * seq_length * heads * (qk_dim + v_dim)


class RouterCapture:
    """Record ``(router logits (tokens, E), selected experts (tokens, k))`` for every router call.

    Contract (works under activation checkpointing): calls are recorded only while a forward of ``model``
    (or of its base model, for trainers that call ``model.model`` and apply the LM head themselves) is
    running. The outermost such forward clears the previous records when it starts, so after each forward
    ``layers()`` holds exactly that forward's router calls, in layer order. Recomputation during backward
    (HF's non-reentrant checkpointing re-runs the decoder layers, router hooks included) happens outside
    any model forward and is ignored. The recorded logits keep their autograd graph, so losses built from
    them train the routers; with reentrant checkpointing the forward runs under ``no_grad`` and the router
    would get no gradient, so use ``use_reentrant=False`` (HF's default).
    """

    def __init__(self, model: nn.Module, info: MoEInfo, entry_modules: list[nn.Module] | None = None) -> None:
        self._info = info
        self._records: list[tuple[Tensor, Tensor]] = []
        self._depth = 0
        entries = entry_modules if entry_modules is not None else [model]
        if entry_modules is None:
            base = getattr(model, "base_model", None)
            if isinstance(base, nn.Module) and base is not model:
                entries.append(base)
        self._handles = []
        for module in entries:
            self._handles.append(module.register_forward_pre_hook(self._enter))
            self._handles.append(module.register_forward_hook(self._exit, always_call=True))
        for _, router in info.routers:
            self._handles.append(router.register_forward_hook(self._record))

    def _enter(self, module: nn.Module, args: Any) -> None:
        if self._depth == 0:
            self._records = []
        self._depth += 1

    def _exit(self, module: nn.Module, args: Any, output: Any) -> None:
        self._depth = max(0, self._depth - 1)

    def _record(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._depth == 0:
            return
        logits, indices = _split_router_output(output, self._info)
        self._records.append((logits, indices))

    def clear(self) -> None:
        """Forget the recorded calls (a new outermost forward also does this)."""
        self._records = []

    def remove(self) -> None:
        """Unregister every hook; the capture records nothing afterwards."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._records = []

    def layers(self) -> list[tuple[Tensor, Tensor]]:
        """Per router call of the last forward: (logits (tokens, E), indices (tokens, top_k) int64)."""
        return list(self._records)

    def __enter__(self) -> RouterCapture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _split_router_output(output: Any, info: MoEInfo) -> tuple[Tensor, Tensor]:
    """Pick the logits and the selected-expert indices out of a router's output tuple.

    The indices are the router's own choice (the integer tensor of shape ``(tokens, top_k)``), which for
    DeepSeek-style routers (sigmoid + correction bias + group limit) differs from a softmax top-k of the
    logits. Routers that return no indices (Llama-4) fall back to the top-k of the logits.
    """
    items = output if isinstance(output, (tuple, list)) else (output,)
    logits = items[info.router_logits_index]
    logits = logits.reshape(-1, logits.shape[-1])  # (tokens, E)
    for item in items:
        if (
            isinstance(item, Tensor)
            and not item.is_floating_point()
            and item.dim() >= 1
            and item.shape[-1] == info.top_k
            and item.numel() == logits.shape[0] * info.top_k
        ):
            return logits, item.reshape(-1, info.top_k).long()  # (tokens, top_k)
    return logits, torch.topk(logits.detach(), info.top_k, dim=-1).indices
