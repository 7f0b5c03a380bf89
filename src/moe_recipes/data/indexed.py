"""Megatron-LM's MMIDIDX indexed dataset: a flat token file (.bin) and an index (.idx).

Index layout (little endian), as Megatron-LM's `tools/preprocess_data.py` writes it:

    b"MMIDIDX\\x00\\x00"                      9-byte magic
    u64 version (= 1)
    u8  dtype code (1 u8, 2 i8, 3 i16, 4 i32, 5 i64, 6 f64, 7 f32, 8 u16)
    u64 sequence count S
    u64 document-index length D (= documents + 1)
    i32[S] sequence lengths (tokens)
    i64[S] byte offsets of each sequence in .bin
    i64[D] document index (sequence number where each document starts; first 0, last S)

We write one sequence per document, so sequences and documents coincide.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPE_CODES: dict[int, type[np.generic]] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
CODE_OF_DTYPE = {np.dtype(v): k for k, v in DTYPE_CODES.items()}


def token_dtype(vocab_size: int) -> type[np.generic]:
    """uint16 for vocabularies that fit (< 65500 ids, Megatron's threshold), else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


def bin_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{prefix}.bin")


def idx_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{prefix}.idx")


def write_index(
    path: str | os.PathLike, dtype: type[np.generic], lengths: np.ndarray, doc_idx: np.ndarray | None = None
) -> None:
    """Write an .idx for sequences of `lengths` tokens stored back to back in the .bin."""
    dtype = np.dtype(dtype)
    lengths = np.asarray(lengths, dtype=np.int32)
    pointers = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        np.cumsum(lengths[:-1].astype(np.int64) * dtype.itemsize, out=pointers[1:])
    if doc_idx is None:
        doc_idx = np.arange(len(lengths) + 1, dtype=np.int64)
    doc_idx = np.asarray(doc_idx, dtype=np.int64)
    with open(path, "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<Q", VERSION))
        f.write(struct.pack("<B", CODE_OF_DTYPE[dtype]))
        f.write(struct.pack("<Q", len(lengths)))
        f.write(struct.pack("<Q", len(doc_idx)))
        f.write(lengths.tobytes(order="C"))
        f.write(pointers.tobytes(order="C"))
        f.write(doc_idx.tobytes(order="C"))


class IndexedDataset:
    """Read-only, memory-mapped view of PREFIX.bin/PREFIX.idx.

    `ds[i]` is sequence i as a numpy array; `ds.get(i, offset, length)` a slice of it without copying
    the rest. `sizes` are the sequence lengths, `pointers` their byte offsets, `doc_idx` the document index.
    """

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = str(prefix)
        ipath, bpath = idx_path(prefix), bin_path(prefix)
        for p in (ipath, bpath):
            if not p.exists():
                raise FileNotFoundError(f"indexed dataset file not found: {p}")
        with open(ipath, "rb") as f:
            magic = f.read(9)
            if magic != MAGIC:
                raise ValueError(f"{ipath}: not an MMIDIDX index (magic {magic!r})")
            (version,) = struct.unpack("<Q", f.read(8))
            if version != VERSION:
                raise ValueError(f"{ipath}: unsupported index version {version}")
            (code,) = struct.unpack("<B", f.read(1))
            if code not in DTYPE_CODES:
                raise ValueError(f"{ipath}: unknown dtype code {code}")
            self.dtype = np.dtype(DTYPE_CODES[code])
            (self._len,) = struct.unpack("<Q", f.read(8))
            (self._doc_count,) = struct.unpack("<Q", f.read(8))
            offset = f.tell()
        expected = offset + self._len * (4 + 8) + self._doc_count * 8
        actual = ipath.stat().st_size
        if actual != expected:
            raise ValueError(f"{ipath}: truncated or corrupt index ({actual} bytes, expected {expected})")
        self._idx_mmap = np.memmap(ipath, mode="r", order="C")
        buf = memoryview(self._idx_mmap)
        self.sizes = np.frombuffer(buf, dtype=np.int32, count=self._len, offset=offset)
        self.pointers = np.frombuffer(buf, dtype=np.int64, count=self._len, offset=offset + self.sizes.nbytes)
        self.doc_idx = np.frombuffer(
            buf,
            dtype=np.int64,
            count=self._doc_count,
            offset=offset + self.sizes.nbytes + self.pointers.nbytes,
        )
        total = int(self.sizes.astype(np.int64).sum()) * self.dtype.itemsize
        if bpath.stat().st_size != total:
            raise ValueError(f"{bpath}: size {bpath.stat().st_size} does not match its index ({total} bytes)")
        self._bin = np.memmap(bpath, mode="r", dtype=self.dtype) if total else np.zeros(0, self.dtype)

    def __len__(self) -> int:
        return self._len

    @property
    def num_tokens(self) -> int:
        return int(self.sizes.astype(np.int64).sum())

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        if not 0 <= i < self._len:
            raise IndexError(f"sequence {i} out of range for {self.prefix} ({self._len} sequences)")
        size = int(self.sizes[i])
        if length is None:
            length = size - offset
        start = int(self.pointers[i]) // self.dtype.itemsize + offset
        return self._bin[start : start + length]
