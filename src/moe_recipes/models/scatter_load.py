"""Start from ``.bin`` weights: built on meta and sharded as the sharded start, then rank 0 reads, the others receive.

A folder of torch weight files (``pytorch_model.bin``, or ``pytorch_model-0000i-of-0000n.bin`` with
``pytorch_model.bin.index.json``) cannot be read by rows on every rank as safetensors are (`sharded_load`):
a torch file is a pickle, and every rank unpickling every file would map the whole checkpoint on each. So,
after the same meta build, cut and ``to_empty`` as the sharded start:

1. rank 0 alone opens the files (``torch.load(..., mmap=True, weights_only=True)``: lazily mapped, one file at
   a time, two where one in-memory tensor's file tensors lie in two shards) and tells the others which file
   tensors exist;
2. for each in-memory parameter and persistent buffer, in an order every rank derives from the model and that
   list (`sharded_load.tensors_to_fill`, sorted by file), rank 0 builds the whole in-memory tensor from its
   file tensors through the released layout (`hf_layout.FileTensor.put`: per-expert file tensors become
   rows of the fused experts), keeps its own rows and sends every other rank exactly the rows it holds (the
   rows `fill_from_folder` would read), which that rank receives straight into its shard;
3. what the folder lacks is initialised as ``from_pretrained`` does, by the same code as the sharded start.

Peak per rank: its shards, plus on rank 0 one whole in-memory tensor and the pages of the mapped file(s).
The parameters equal ``from_pretrained``'s bit for bit (tests/models/test_rank0_scatter.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from moe_recipes.hf_layout import FileTensor
from moe_recipes.models.sharded_load import (
    FillReport,
    _initialise_the_rest,
    _Part,
    _pieces_in_folder,
    tensors_to_fill,
)

BIN_INDEX = "pytorch_model.bin.index.json"
BIN_FILE = "pytorch_model.bin"


def has_bin_weights(folder: str | Path) -> bool:
    """Whether the Hugging Face folder holds torch ``.bin`` weights (one file, or an index of shards)."""
    folder = Path(folder)
    return (folder / BIN_FILE).is_file() or (folder / BIN_INDEX).is_file()


def _open(path: Path) -> dict[str, torch.Tensor]:
    """A torch weight file, memory-mapped: tensors are read from the page cache when touched."""
    return torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)


def _bin_weight_files(folder: Path) -> dict[str, Path]:
    """File tensor name -> the .bin file that holds it (an index, or a single pytorch_model.bin)."""
    index = folder / BIN_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / BIN_FILE
    if not single.is_file():
        raise FileNotFoundError(f"{folder} holds no torch weights ({BIN_FILE} or {BIN_INDEX})")
    return dict.fromkeys(_open(single), single)


class _BinFiles:
    """Rank 0's mapped .bin files: only those the tensor in hand needs stay open."""

    def __init__(self, files: dict[str, Path]):
        self.files = files
        self._open: dict[Path, dict[str, torch.Tensor]] = {}

    def keep_only(self, paths: set[Path]) -> None:
        for path in [p for p in self._open if p not in paths]:
            del self._open[path]  # its memory map goes with the last reference

    def get(self, name: str) -> torch.Tensor:
        path = self.files[name]
        if path not in self._open:
            self._open[path] = _open(path)
        return self._open[path][name]


def _rows(part: _Part) -> tuple[int, int] | None:
    """The rows ``[start, stop)`` this part holds (None: a 0-dim tensor, held whole)."""
    if not part.local.dim():
        return None
    return part.start, part.start + part.local.shape[0]


def _assemble(reader: _BinFiles, pieces: tuple[FileTensor, ...], part: _Part) -> tuple[torch.Tensor, int]:
    """The whole in-memory tensor (in the local dtype) built from its file tensors; and the bytes read."""
    whole = torch.empty(part.shape, dtype=part.local.dtype)
    read = 0
    for piece in pieces:
        value = reader.get(piece.name)
        read += value.numel() * value.element_size()
        if whole.dim():
            piece.put(whole, value)  # copy_ converts the file's dtype, as from_pretrained does
        else:
            whole.copy_(value)
    return whole, read


def _receive(local: torch.Tensor) -> None:
    """Receive this rank's rows from rank 0 straight into `local` (through a buffer if it is not contiguous)."""
    if local.numel() == 0:
        return
    buffer = (
        local if local.is_contiguous() else torch.empty_like(local, memory_format=torch.contiguous_format)
    )
    dist.recv(buffer, src=0)
    if buffer is not local:
        local.copy_(buffer)


@torch.no_grad()
def scatter_from_rank0(model: nn.Module, folder: str | Path) -> FillReport:
    """Fill `model`'s materialised parts (FSDP2 shards, expert-parallel slices, whole tensors) from the .bin
    weights of `folder`: rank 0 reads every tensor and sends each rank its rows; no other rank opens a
    weight file. Collective over the default process group. `model` is the Hugging Face model."""
    folder = Path(folder)
    rank, world = dist.get_rank(), dist.get_world_size()
    shared: list[Any] = [_bin_weight_files(folder) if rank == 0 else None]
    dist.broadcast_object_list(shared, src=0)
    where: dict[str, Path] = shared[0]
    todo, missing = [], []
    for name, tensor, part, released in tensors_to_fill(model):
        if part.flat:
            raise ValueError(f"{name}: ZeRO-3 partitions are not filled by rank 0's scatter")
        pieces = _pieces_in_folder(name, released, part.shape, where)
        if pieces is None:
            missing.append(name)
        else:
            todo.append((name, tensor, part, pieces))
    # file by file (a fixed order: `where` is the same on every rank), so rank 0 maps one file at a time
    file_order = {path: i for i, path in enumerate(sorted(set(where.values())))}
    todo.sort(key=lambda t: sorted({file_order[where[f.name]] for f in t[3]}))
    every: list[Any] = [None] * world
    dist.all_gather_object(every, [_rows(part) for _, _, part, _ in todo])
    reader = _BinFiles(where) if rank == 0 else None
    read = 0
    for i, (_, tensor, part, pieces) in enumerate(todo):
        if reader is None:
            _receive(part.local)
        else:
            reader.keep_only({where[f.name] for f in pieces})
            whole, n = _assemble(reader, pieces, part)
            read += n
            whole = whole.to(part.local.device)
            for r in range(1, world):
                rows = every[r][i]
                out = whole if rows is None else whole[rows[0] : rows[1]]
                if out.numel():
                    dist.send(out.contiguous(), dst=r)
            own = _rows(part)
            part.local.copy_(whole if own is None else whole[own[0] : own[1]])
            del whole
        tensor._is_hf_initialized = True  # transformers' init functions leave it alone
    if reader is not None:
        reader.keep_only(set())
    _initialise_the_rest(model)
    return FillReport(len(todo), read, missing)
