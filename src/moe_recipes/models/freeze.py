"""Freeze parameters by kind (router, experts, attention, ...) or by name pattern, before training starts.

Kinds are found from the module tree (``inspect_model``), never from per-family name tables:

* ``router``: the router modules; ``experts``: the modules holding fused (3-D) routed-expert weights;
  ``shared_experts``: the other parameterised children of each MoE block;
* ``attention``: children of each decoder layer whose class name contains ``Attention``;
* ``embeddings``: the input embedding table; ``lm_head``: the output projection (tied weights are one
  tensor, so freezing either freezes both);
* ``layers:I-J`` (or ``layers:I``): every parameter of decoder layers I..J (0-based, inclusive).

Patterns are regular expressions searched (``re.search``) in the names of ``model.named_parameters()``.
Frozen parameters get ``requires_grad=False``; the trainer's optimizer groups skip them, so they are not in
the optimizer at all (no Adam state, no weight decay). A kind or pattern that matches nothing is an error:
a typo must not silently train everything.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from torch import nn

from moe_recipes.models.inspect import MoEInfo, _expert_modules, _shared_modules

KINDS = ("router", "experts", "shared_experts", "attention", "embeddings", "lm_head")
_LAYERS_RE = re.compile(r"^layers:(\d+)(?:-(\d+))?$")


@dataclass(frozen=True)
class FreezeReport:
    """Parameter counts (elements) after freezing."""

    trainable: int
    total: int

    @property
    def frozen(self) -> int:
        return self.total - self.trainable


def _as_list(key: str, value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{key} must be a list of strings, got {value!r}")
    return value


def _layer_range(item: str) -> tuple[int, int] | None:
    match = _LAYERS_RE.match(item)
    if match is None:
        return None
    first = int(match.group(1))
    last = int(match.group(2)) if match.group(2) is not None else first
    if last < first:
        raise ValueError(f"moe.freeze: {item!r} has an empty layer range ({first} > {last})")
    return first, last


def check_freeze_spec(kinds: Any, patterns: Any) -> None:
    """Validate ``moe.freeze`` and ``moe.freeze_patterns`` without a model (config validation)."""
    for item in _as_list("moe.freeze", kinds):
        if item not in KINDS and _layer_range(item) is None:
            raise ValueError(f"moe.freeze: {item!r} is not one of {', '.join(KINDS)} or layers:I-J")
    for pattern in _as_list("moe.freeze_patterns", patterns):
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"moe.freeze_patterns: {pattern!r} is not a regular expression ({err})") from err


def decoder_layers(model: nn.Module, info: MoEInfo) -> list[nn.Module]:
    """The decoder layer modules in order (outermost matches only)."""
    layers: list[nn.Module] = []
    for module in model.modules():
        if type(module) in info.decoder_layer_classes and not any(module in m.modules() for m in layers):
            layers.append(module)
    return layers


def _kind_modules(model: nn.Module, info: MoEInfo, kind: str) -> list[nn.Module]:
    if kind == "router":
        return [r for _, r in info.routers]
    if kind == "experts":
        return [m for _, b in info.moe_blocks for m in _expert_modules(b)]
    if kind == "shared_experts":
        return [m for (_, b), (_, r) in zip(info.moe_blocks, info.routers) for m in _shared_modules(b, r)]
    if kind == "attention":
        return [
            c
            for layer in decoder_layers(model, info)
            for c in layer.children()
            if "Attention" in type(c).__name__
        ]
    if kind == "embeddings":
        return [model.get_input_embeddings()]
    if kind == "lm_head":
        return [m for m in [model.get_output_embeddings()] if m is not None]
    first, last = _layer_range(kind) or (0, -1)
    layers = decoder_layers(model, info)
    if last >= len(layers):
        raise ValueError(
            f"moe.freeze: {kind!r} but the model has {len(layers)} decoder layers (0-{len(layers) - 1})"
        )
    return layers[first : last + 1]


def freeze_parameters(model: nn.Module, info: MoEInfo, kinds: Any = (), patterns: Any = ()) -> FreezeReport:
    """Set ``requires_grad=False`` on the parameters selected by ``kinds`` and ``patterns``.

    Raises ValueError naming the kind or pattern that selects no parameter, or when nothing would be
    left to train.
    """
    kinds, patterns = _as_list("moe.freeze", list(kinds)), _as_list("moe.freeze_patterns", list(patterns))
    check_freeze_spec(kinds, patterns)
    for kind in kinds:
        params = [p for m in _kind_modules(model, info, kind) for p in m.parameters()]
        if not params:
            raise ValueError(f"moe.freeze: {kind!r} matches no parameter of this {type(model).__name__}")
        for p in params:
            p.requires_grad_(False)
    named = list(model.named_parameters())
    for pattern in patterns:
        regex = re.compile(pattern)
        hits = [p for name, p in named if regex.search(name)]
        if not hits:
            raise ValueError(
                f"moe.freeze_patterns: {pattern!r} matches no parameter name (e.g. {named[0][0] if named else '-'})"
            )
        for p in hits:
            p.requires_grad_(False)
    report = count_trainable(model)
    if report.trainable == 0 and (kinds or patterns):
        raise ValueError(f"moe.freeze={kinds} / moe.freeze_patterns={patterns} freeze every parameter")
    return report


def count_trainable(model: nn.Module) -> FreezeReport:
    """(trainable, total) element counts of the unique parameters (ZeRO-3 partitioned ones at full size)."""
    seen: dict[int, Any] = {}
    for p in model.parameters():
        seen.setdefault(id(p), p)
    total = sum(int(getattr(p, "ds_numel", p.numel())) for p in seen.values())
    trainable = sum(int(getattr(p, "ds_numel", p.numel())) for p in seen.values() if p.requires_grad)
    return FreezeReport(trainable=trainable, total=total)
