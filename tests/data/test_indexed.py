"""The MMIDIDX writer/reader against an independent struct-based parser of the format's bytes."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from moe_recipes.data.indexed import IndexedDataset, token_dtype, write_index

# Megatron-LM's dtype codes, written out here rather than taken from the module under test.
UINT16_CODE, INT32_CODE = 8, 4


def read_idx_with_struct(path: Path) -> dict:
    """Parse an .idx with nothing but `struct`, following the layout in shared/FACTS.md."""
    raw = path.read_bytes()
    magic = raw[:9]
    version, code, count, doc_count = struct.unpack_from("<QBQQ", raw, 9)
    pos = 9 + 8 + 1 + 8 + 8
    lengths = list(struct.unpack_from(f"<{count}i", raw, pos))
    pos += 4 * count
    pointers = list(struct.unpack_from(f"<{count}q", raw, pos))
    pos += 8 * count
    doc_idx = list(struct.unpack_from(f"<{doc_count}q", raw, pos))
    pos += 8 * doc_count
    return {
        "magic": magic, "version": version, "code": code, "count": count, "doc_count": doc_count,
        "lengths": lengths, "pointers": pointers, "doc_idx": doc_idx, "trailing": len(raw) - pos,
    }  # fmt: skip


def expected_pointers(lengths: list[int], itemsize: int) -> list[int]:
    out, pos = [], 0
    for n in lengths:
        out.append(pos)
        pos += n * itemsize
    return out


def write_dataset(prefix: Path, docs: list[list[int]], dtype: type[np.generic]) -> None:
    with open(f"{prefix}.bin", "wb") as f:
        for doc in docs:
            f.write(np.asarray(doc, dtype=dtype).tobytes())
    write_index(f"{prefix}.idx", dtype, np.array([len(d) for d in docs]))


@pytest.mark.parametrize(
    ("dtype", "code", "max_id"), [(np.uint16, UINT16_CODE, 31999), (np.int32, INT32_CODE, 129279)]
)
def test_index_bytes_follow_the_megatron_layout(tmp_path: Path, dtype, code: int, max_id: int) -> None:
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, max_id + 1, size=int(n)).tolist() for n in rng.integers(1, 300, size=57)]
    prefix = tmp_path / "ds"
    write_dataset(prefix, docs, dtype)

    idx = read_idx_with_struct(Path(f"{prefix}.idx"))
    lengths = [len(d) for d in docs]
    itemsize = np.dtype(dtype).itemsize
    assert idx["magic"] == b"MMIDIDX\x00\x00"
    assert (idx["version"], idx["code"], idx["count"], idx["doc_count"]) == (1, code, 57, 58)
    assert idx["lengths"] == lengths
    assert idx["pointers"] == expected_pointers(lengths, itemsize)
    assert idx["doc_idx"] == list(range(58))
    assert idx["trailing"] == 0

    ds = IndexedDataset(prefix)
    assert len(ds) == 57 and ds.dtype == np.dtype(dtype) and ds.num_tokens == sum(lengths)
    for i, doc in enumerate(docs):
        assert ds[i].tolist() == doc
    assert ds.get(3, offset=2, length=5).tolist() == docs[3][2:7]


@pytest.mark.parametrize(
    ("vocab", "dtype"), [(32000, np.uint16), (65499, np.uint16), (65500, np.int32), (129280, np.int32)]
)
def test_token_dtype_threshold(vocab: int, dtype) -> None:
    assert token_dtype(vocab) is dtype


def test_empty_dataset_round_trips(tmp_path: Path) -> None:
    write_dataset(tmp_path / "empty", [], np.uint16)
    ds = IndexedDataset(tmp_path / "empty")
    assert len(ds) == 0 and ds.num_tokens == 0
    assert read_idx_with_struct(tmp_path / "empty.idx")["doc_idx"] == [0]


def test_reader_rejects_broken_files(tmp_path: Path) -> None:
    prefix = tmp_path / "ds"
    write_dataset(prefix, [[1, 2, 3], [4, 5]], np.uint16)
    idx, bin_ = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    good_idx, good_bin = idx.read_bytes(), bin_.read_bytes()

    bin_.write_bytes(good_bin[:-2])
    with pytest.raises(ValueError, match="does not match its index"):
        IndexedDataset(prefix)
    bin_.write_bytes(good_bin)

    idx.write_bytes(good_idx[:-8])
    with pytest.raises(ValueError, match="truncated"):
        IndexedDataset(prefix)

    idx.write_bytes(b"NOTMAGIC!" + good_idx[9:])
    with pytest.raises(ValueError, match="not an MMIDIDX"):
        IndexedDataset(prefix)

    idx.unlink()
    with pytest.raises(FileNotFoundError, match=r"ds\.idx"):
        IndexedDataset(prefix)
