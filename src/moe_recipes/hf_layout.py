"""The released tensor layout of Hugging Face checkpoints, both ways: the one home of that mapping.

transformers 5 holds some weights in memory in another shape than its checkpoints store them: the routed
experts of an MoE layer are fused (``mlp.experts.gate_up_proj [E, 2I, H]``, ``mlp.experts.down_proj
[E, H, I]``), while released checkpoints, and every reader besides transformers 5 (vLLM, SGLang, llama.cpp's
converter, transformers 4.x), hold one tensor per expert and projection under other names (Mixtral
``block_sparse_moe.experts.E.w1/w2/w3.weight``, Qwen/DeepSeek/OLMoE ``mlp.experts.E.gate_proj/up_proj/
down_proj.weight``). ``from_pretrained`` converts on load; ``save_pretrained`` reverses that conversion.

This module derives the same mapping from transformers' own conversion rules (``conversion_mapping``, the
list ``from_pretrained`` applies, run in reverse as ``save_pretrained`` runs it), so a new architecture works
as soon as transformers knows it; there is no per-model table here. For each in-memory tensor it answers:

* which file tensors it becomes (`FileTensor`: released name, shape, and the block of the in-memory tensor it
  holds), used by everything that writes a Hugging Face folder (`hf_folder.write_weights`);
* which rows of which file tensors hold rows ``a:b`` of it (`FileTensor.rows`), for readers that load only
  their own shard of a tensor.

How the blocks are found: the reverse conversion is run once on ``meta`` tensors (names and shapes), and,
for tensors that it does not simply rename, once per dimension on an index probe (``arange`` along that
dimension, broadcast to the full shape without memory); the values each output piece receives tell where in
the in-memory tensor it came from. A conversion that is not a re-arrangement of blocks (a transpose is fine;
interleaving or merging several in-memory tensors into one file tensor is not) raises a ValueError naming
the tensor.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

Index = int | tuple[int, int]  # one in-memory dimension: a single position (dropped) or a [start, stop) range


@dataclass(frozen=True)
class FileTensor:
    """One tensor of the released layout and the block of an in-memory tensor that it holds.

    For each dimension ``d`` of the in-memory tensor, ``block[d]`` is what it contributes (one position, when
    the file tensor has no such dimension, or a [start, stop) range) and ``dims[d]`` the file dimension that
    range runs along (None for a single position). File dimensions that no in-memory dimension runs along
    have size 1.
    """

    name: str
    shape: tuple[int, ...]
    block: tuple[Index, ...]
    dims: tuple[int | None, ...]

    @classmethod
    def whole(cls, name: str, shape: tuple[int, ...]) -> FileTensor:
        """A file tensor that is the whole in-memory tensor, under `name`."""
        return cls(name, shape, tuple((0, s) for s in shape), tuple(range(len(shape))))

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def _index(self) -> tuple[int | slice, ...]:
        return tuple(b if isinstance(b, int) else slice(*b) for b in self.block)

    def _order(self) -> tuple[int, ...]:
        """The kept in-memory dimensions (numbered among themselves) in file order."""
        kept = [k for k in self.dims if k is not None]
        return tuple(sorted(range(len(kept)), key=lambda i: kept[i]))

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        """This file tensor's values, cut from the whole in-memory `tensor` (a view where possible)."""
        return tensor[self._index()].permute(self._order()).reshape(self.shape)

    def put(
        self, tensor: torch.Tensor, value: torch.Tensor, index: tuple[int | slice, ...] | None = None
    ) -> None:
        """Copy the file tensor's `value` (or the rows `rows` asked for) into its block of `tensor`.

        `index` is `rows`'s destination index into a local tensor of some rows; None: `tensor` is whole."""
        view = tensor[self._index() if index is None else index]
        order = self._order()
        kept = [view.shape[i] for i in order]
        view.copy_(value.reshape(kept).permute(_inverse(order)))

    def rows(self, start: int, stop: int) -> tuple[tuple[slice, ...], tuple[int | slice, ...]] | None:
        """What this file tensor holds of rows ``start:stop`` (dim 0) of the in-memory tensor; None if nothing.

        Returns ``(file_index, dest_index)``: read ``file[file_index]`` (a range of one file dimension: one
        contiguous run of bytes when it is the file's first) and `put` it at ``dest_index`` of the local
        tensor that holds rows ``start:stop``.
        """
        first = self.block[0]
        lo, hi = (first, first + 1) if isinstance(first, int) else first
        a, b = max(lo, start), min(hi, stop)
        if a >= b:
            return None
        file_index = [slice(None)] * len(self.shape)
        dest: list[int | slice] = [a - start]
        if not isinstance(first, int):
            file_index[self.dims[0]] = slice(a - lo, b - lo)  # type: ignore[index]
            dest = [slice(a - start, b - start)]
        dest += [x if isinstance(x, int) else slice(*x) for x in self.block[1:]]
        return tuple(file_index), tuple(dest)


def _inverse(order: tuple[int, ...]) -> tuple[int, ...]:
    inv = [0] * len(order)
    for i, o in enumerate(order):
        inv[o] = i
    return tuple(inv)


@dataclass(frozen=True)
class ReleasedLayout:
    """In-memory name -> the file tensors it becomes, for the in-memory tensors it was built for."""

    pieces: dict[str, tuple[FileTensor, ...]]

    def file_names(self) -> list[str]:
        return [f.name for files in self.pieces.values() for f in files]

    def split(self, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """The file tensors of in-memory tensor `name` (views of `tensor` where possible)."""
        return {f.name: f.take(tensor) for f in self.pieces[name]}


class _NoCopies(TorchFunctionMode):
    """Make ``Tensor.contiguous`` return its input, so probes broadcast without memory stay views."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if func is torch.Tensor.contiguous:
            return args[0]
        return func(*args, **(kwargs or {}))


class _WithConversions:
    """`model` as transformers' reverse conversion sees it, with the released layout's conversions."""

    def __init__(self, model: Any, conversions: list[Any] | None):
        self._model = model
        self._weight_conversions = conversions

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


def released_conversions(model: Any) -> list[Any] | None:
    """The conversions `from_pretrained` applies to a released checkpoint of `model`'s class.

    What the model class declares, not what the model was loaded with: a model read from a folder in the
    fused in-memory layout used no conversion, yet its released layout is still the per-expert one.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange

    conversions = get_model_conversion_mapping(model, add_legacy=False)
    conversions = [c for c in conversions if not isinstance(c, PrefixChange)]
    return conversions or None


def _revert(view: _WithConversions, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(view, dict(tensors))


def released_layout(model: Any, shapes: Iterable[tuple[str, tuple[int, ...]]]) -> ReleasedLayout:
    """The released layout of `model`'s in-memory tensors `shapes` (name, whole shape), in the given order.

    `model` may be on the meta device, sharded or partitioned: only its class, config and module tree are
    used. Raises ValueError when transformers' conversion does something that is not a block re-arrangement.
    """
    shapes = [(name, tuple(shape)) for name, shape in shapes]
    view = _WithConversions(model, released_conversions(model))
    if view._weight_conversions is None:
        return ReleasedLayout({name: (FileTensor.whole(name, shape),) for name, shape in shapes})
    metas = {name: torch.empty(shape, device="meta") for name, shape in shapes}
    whole = _revert(view, metas)  # every name at once, as save_pretrained reverts its state dict
    pieces: dict[str, tuple[FileTensor, ...]] = {}
    for name, shape in shapes:
        out = _revert(view, {name: metas[name]})
        if len(out) == 1 and tuple(next(iter(out.values())).shape) == shape:
            pieces[name] = (FileTensor.whole(next(iter(out)), shape),)
        else:
            pieces[name] = _probe(view, name, shape, {k: tuple(v.shape) for k, v in out.items()})
    found = {f.name: f.shape for fs in pieces.values() for f in fs}
    expected = {k: tuple(v.shape) for k, v in whole.items()}
    if found != expected:
        odd = sorted(set(found.items()) ^ set(expected.items()))[:4]
        raise ValueError(
            f"{type(model).__name__}: transformers' reverse conversion combines several in-memory tensors "
            f"into one file tensor ({odd}); writing this layout tensor by tensor is not supported"
        )
    return ReleasedLayout(pieces)


def _probe(
    view: _WithConversions, name: str, shape: tuple[int, ...], out_shapes: dict[str, tuple[int, ...]]
) -> tuple[FileTensor, ...]:
    """Find the block of `name` that each output piece holds, from one index probe per dimension."""
    # found[file name][d] = (the file dim along which in-memory dim d runs, or None; its first index)
    found: dict[str, list[tuple[int | None, int]]] = {k: [] for k in out_shapes}
    for d, size in enumerate(shape):
        view_shape = [1] * len(shape)
        view_shape[d] = size
        probe = torch.arange(size).view(view_shape).expand(shape)
        with _NoCopies(), torch.no_grad():
            out = _revert(view, {name: probe})
        if set(out) != set(out_shapes):
            raise ValueError(
                f"{name}: the reverse conversion gave other names on a probe ({sorted(out)[:3]})"
            )
        for file_name, piece in out.items():
            found[file_name].append(_runs_along(name, file_name, piece))
    files = []
    for file_name, per_dim in found.items():
        file_shape = out_shapes[file_name]
        block = tuple(first if k is None else (first, first + file_shape[k]) for k, first in per_dim)
        ft = FileTensor(file_name, file_shape, block, tuple(k for k, _ in per_dim))
        if ft.numel != _block_numel(ft.block):
            raise ValueError(
                f"{name} -> {file_name}: the file tensor is not one block of the in-memory tensor"
            )
        files.append(ft)
    return tuple(files)


def _block_numel(block: tuple[Index, ...]) -> int:
    n = 1
    for b in block:
        if not isinstance(b, int):
            n *= b[1] - b[0]
    return n


def _runs_along(name: str, file_name: str, piece: torch.Tensor) -> tuple[int | None, int]:
    """(the piece's dimension along which the probed index increases by 1, or None; the first index)."""
    origin = piece[(0,) * piece.dim()] if piece.dim() else piece
    first = int(origin)
    along = None
    for k in range(piece.dim()):
        if piece.shape[k] == 1:
            continue
        line = piece[tuple(slice(None) if j == k else 0 for j in range(piece.dim()))]
        far = piece[tuple(slice(None) if j == k else -1 for j in range(piece.dim()))]
        if torch.equal(line, torch.full_like(line, first)) and torch.equal(far, torch.full_like(far, far[0])):
            continue  # the probed index does not change along file dimension k
        expected = torch.arange(first, first + piece.shape[k], dtype=line.dtype)
        if along is not None or not torch.equal(line, expected) or not torch.equal(far, expected):
            raise ValueError(
                f"{name} -> {file_name}: transformers' reverse conversion is not a block re-arrangement "
                "(interleaved or reordered rows); not supported"
            )
        along = k
    return along, first
