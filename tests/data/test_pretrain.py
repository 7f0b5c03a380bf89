"""Pre-training samples, splits, blends and the cached sample index, checked against hand-built streams."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from moe_recipes.data.indexed import IndexedDataset, write_index
from moe_recipes.data.pretrain import (
    BlendedDataset,
    PretrainDataset,
    build_blend_index,
    build_pretrain_datasets,
    parse_data_path,
    parse_split,
    split_document_ranges,
)

from ..assets import CORPUS_EN, MIXTRAL_TOKENIZER


def write_docs(prefix: Path, docs: list[np.ndarray], dtype: type[np.generic] = np.int32) -> str:
    """Write documents as PREFIX.bin/.idx, one sequence per document."""
    flat = np.concatenate(docs) if docs else np.zeros(0)
    flat.astype(dtype).tofile(f"{prefix}.bin")
    write_index(f"{prefix}.idx", dtype, np.array([len(d) for d in docs], dtype=np.int32))
    return str(prefix)


def unique_docs(lengths: list[int], first_token: int = 1) -> list[np.ndarray]:
    """Documents whose tokens are all different (a running counter), so every token names its origin."""
    bounds = np.cumsum([0, *lengths]) + first_token
    return [np.arange(a, b, dtype=np.int64) for a, b in zip(bounds[:-1], bounds[1:])]


def random_lengths(num_docs: int, seed: int, low: int = 1, high: int = 40) -> list[int]:
    return np.random.default_rng(seed).integers(low, high, size=num_docs).tolist()


def check_samples_against_stream(ds: PretrainDataset) -> None:
    """Every sample equals its window of the document stream rebuilt by hand from the saved doc order."""
    docs = [np.asarray(ds.indexed[int(d)], dtype=np.int64) for d in ds.doc_idx]
    stream = np.concatenate(docs)
    doc_start_positions = set(np.cumsum([0] + [len(d) for d in docs]).tolist())
    L = ds.seq_length
    assert sorted(np.asarray(ds.shuffle_idx).tolist()) == list(range(len(ds)))
    for i in range(len(ds)):
        k = int(ds.shuffle_idx[i])
        sample = ds[i]
        assert sample["tokens"].dtype == np.int64 and sample["tokens"].shape == (L + 1,)
        np.testing.assert_array_equal(sample["tokens"], stream[k * L : k * L + L + 1])
        expected_starts = [0] + [p for p in range(1, L) if k * L + p in doc_start_positions]
        assert sample["doc_starts"].dtype == np.int64
        assert sample["doc_starts"].tolist() == expected_starts, f"sample {i} (window {k})"


# ---------------------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("split", "expected"),
    [
        ("949,50,1", (0.949, 0.05, 0.001)),
        ("1,0,0", (1.0, 0.0, 0.0)),
        ("98,2", (0.98, 0.02, 0.0)),
        ("1/1/2", (0.25, 0.25, 0.5)),
        (" 3 , 1 ,0", (0.75, 0.25, 0.0)),
    ],
)
def test_parse_split(split: str, expected: tuple[float, float, float]) -> None:
    assert parse_split(split) == pytest.approx(expected)


@pytest.mark.parametrize("split", ["", "1,2,3,4", "a,1,1", "-1,1,1", "0,0,0", "1,,1", "nan,1,1", "inf,1,0"])
def test_parse_split_errors_name_the_split(split: str) -> None:
    with pytest.raises(ValueError, match="split"):
        parse_split(split)


def test_parse_data_path(tmp_path: Path) -> None:
    a = write_docs(tmp_path / "a", unique_docs([3, 4]))
    b = write_docs(tmp_path / "b", unique_docs([5]))
    assert parse_data_path(a) == [(1.0, a)]
    assert parse_data_path(Path(a)) == [(1.0, a)]
    assert parse_data_path([a]) == [(1.0, a)]
    blend = parse_data_path([1, a, "3", b])
    assert [p for _, p in blend] == [a, b]
    assert [w for w, _ in blend] == pytest.approx([0.25, 0.75])


def test_parse_data_path_errors(tmp_path: Path) -> None:
    a = write_docs(tmp_path / "a", unique_docs([3, 4]))
    with pytest.raises(ValueError, match="3 entries"):
        parse_data_path([1.0, a, 2.0])
    with pytest.raises(ValueError, match="must be > 0"):
        parse_data_path([0, a, 1, a])
    with pytest.raises(ValueError, match="must be > 0"):
        parse_data_path([-1, a, 1, a])
    with pytest.raises(ValueError, match="not a weight"):
        parse_data_path([a, a])
    with pytest.raises(ValueError, match="empty"):
        parse_data_path([])
    missing = str(tmp_path / "nope_text_document")
    with pytest.raises(FileNotFoundError, match="nope_text_document"):
        parse_data_path([1, a, 1, missing])
    with pytest.raises(FileNotFoundError, match="without .bin/.idx"):
        parse_data_path(a + ".bin")
    os.remove(a + ".bin")
    with pytest.raises(FileNotFoundError, match=r"a\.bin"):
        parse_data_path(a)


def test_split_document_ranges() -> None:
    assert split_document_ranges(1000, parse_split("949,50,1")) == [(0, 949), (949, 999), (999, 1000)]
    assert split_document_ranges(10, parse_split("1,0,0")) == [(0, 10), (10, 10), (10, 10)]
    assert split_document_ranges(3, parse_split("1,1,1")) == [(0, 1), (1, 2), (2, 3)]
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(0, 500))
        fractions = parse_split(",".join(str(x) for x in rng.integers(0, 10, size=3) + [1, 0, 0]))
        ranges = split_document_ranges(n, fractions)
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(r[1] == s[0] for r, s in zip(ranges, ranges[1:]))
        assert all(abs((hi - lo) - f * n) <= 1 for (lo, hi), f in zip(ranges, fractions))


def test_build_argument_errors(tmp_path: Path) -> None:
    a = write_docs(tmp_path / "a", unique_docs([30, 40]))
    with pytest.raises(ValueError, match="seq_length"):
        build_pretrain_datasets(a, "1,0,0", 0, (4, 0, 0), 1, tmp_path / "c")
    with pytest.raises(ValueError, match="num_samples"):
        build_pretrain_datasets(a, "1,0,0", 8, (4, 0), 1, tmp_path / "c")
    with pytest.raises(ValueError, match="seed"):
        build_pretrain_datasets(a, "1,0,0", 8, (4, 0, 0), -1, tmp_path / "c")


# ---------------------------------------------------------------------------------------------- samples


def test_samples_equal_the_shuffled_document_stream(tmp_path: Path) -> None:
    lengths = random_lengths(60, seed=1)
    lengths[5] = lengths[17] = 0  # empty documents must not break boundaries
    lengths[9] = 50  # longer than a sample
    prefix = write_docs(tmp_path / "d", unique_docs(lengths))
    train, valid, test = build_pretrain_datasets(
        prefix, "1,0,0", 16, (300, 0, 0), seed=7, cache_dir=tmp_path / "cache"
    )
    assert valid is None and test is None
    assert isinstance(train, PretrainDataset) and len(train) >= 300
    num_epochs = len(train.doc_idx) // 60
    assert num_epochs >= 2 and len(train.doc_idx) == 60 * num_epochs
    check_samples_against_stream(train)
    with pytest.raises(IndexError):
        train[len(train)]


def test_every_split_token_is_seen_and_no_other(tmp_path: Path) -> None:
    lengths = random_lengths(100, seed=2)
    docs = unique_docs(lengths)
    prefix = write_docs(tmp_path / "d", docs)
    L = 8
    train, valid, test = build_pretrain_datasets(
        prefix, "80,15,5", L, (400, 60, 30), seed=3, cache_dir=tmp_path / "cache"
    )
    for ds, (lo, hi), n in ((train, (0, 80), 400), (valid, (80, 95), 60), (test, (95, 100), 30)):
        assert isinstance(ds, PretrainDataset) and ds.doc_range == (lo, hi) and len(ds) >= n
        split_tokens = set(np.concatenate(docs[lo:hi]).tolist())
        # each epoch is one permutation of the split's documents
        for block in np.asarray(ds.doc_idx).reshape(-1, hi - lo):
            assert sorted(block.tolist()) == list(range(lo, hi))
        # the windows inside the first epoch cover it: every token of the split is seen once per epoch
        epoch_tokens = sum(lengths[lo:hi])
        first_epoch = [ds.unshuffled_sample(k)["tokens"] for k in range(-(-(epoch_tokens - 1) // L))]
        assert set(np.concatenate(first_epoch).tolist()) >= split_tokens
        seen = set(np.concatenate([ds[i]["tokens"] for i in range(len(ds))]).tolist())
        assert seen == split_tokens
        check_samples_against_stream(ds)


def test_partial_last_epoch_is_shuffled_after_the_full_ones(tmp_path: Path) -> None:
    prefix = write_docs(tmp_path / "d", unique_docs([10] * 20))  # 200 tokens: 24 windows of 8 per epoch
    (train, _, _) = build_pretrain_datasets(prefix, "1,0,0", 8, (52, 0, 0), seed=0, cache_dir=tmp_path / "c")
    full = (2 * 200 - 1) // 8  # windows inside the first two epochs
    assert len(train.doc_idx) == 3 * 20 and len(train) == (3 * 200 - 1) // 8
    assert sorted(np.asarray(train.shuffle_idx[:full]).tolist()) == list(range(full))
    assert np.asarray(train.shuffle_idx[:full]).tolist() != list(range(full))


def test_split_without_documents_is_none(tmp_path: Path) -> None:
    prefix = write_docs(tmp_path / "d", unique_docs([5] * 10))
    train, valid, test = build_pretrain_datasets(
        prefix, "1,0,0", 4, (10, 5, 5), seed=0, cache_dir=tmp_path / "c"
    )
    assert train is not None and valid is None and test is None
    train, valid, test = build_pretrain_datasets(
        prefix, "8,1,1", 4, (0, 5, 0), seed=0, cache_dir=tmp_path / "c"
    )
    assert train is None and valid is not None and len(valid) >= 5 and test is None


# ---------------------------------------------------------------------------------------------- blends


def test_blend_index_prefixes_stay_close_to_weights() -> None:
    weights = [0.2, 0.3, 0.5]
    arrays = build_blend_index(weights, 10_000)
    component = np.asarray(arrays["dataset_index"])
    counts = np.stack([np.cumsum(component == c) for c in range(3)], axis=1)
    targets = np.arange(1, 10_001)[:, None] * np.array(weights)[None, :]
    assert np.abs(counts - targets).max() <= 2
    for c in range(3):  # each component's samples are taken in order 0, 1, 2, ...
        assert np.asarray(arrays["sample_index"])[component == c].tolist() == list(range(counts[-1, c]))


def test_blend_proportions_and_content(tmp_path: Path) -> None:
    prefixes = [
        write_docs(tmp_path / f"p{c}", unique_docs(random_lengths(40, seed=c), 10_000 * (c + 1)))
        for c in range(3)
    ]
    n = 10_000
    train, _, _ = build_pretrain_datasets(
        [2, prefixes[0], 3, prefixes[1], 5, prefixes[2]],
        "1,0,0",
        8,
        (n, 0, 0),
        seed=5,
        cache_dir=tmp_path / "cache",
    )
    assert isinstance(train, BlendedDataset) and len(train) == n
    fractions = np.bincount(np.asarray(train.dataset_index), minlength=3) / n
    assert np.abs(fractions - [0.2, 0.3, 0.5]).max() < 0.01
    for component, weight in zip(train.datasets, [0.2, 0.3, 0.5]):
        assert len(component) >= weight * n * 1.005
    # samples really come from the component the index names (token ranges differ per prefix)
    for i in range(0, n, 97):
        c = int(train.dataset_index[i])
        sample = train[i]
        np.testing.assert_array_equal(
            sample["tokens"], train.datasets[c][int(train.sample_index[i])]["tokens"]
        )
        assert (sample["tokens"] // 10_000 == c + 1).all()


# ---------------------------------------------------------------------------------------------- cache


def cache_files(cache_dir: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in cache_dir.glob("*.npy")}


def test_cache_is_reused_and_keyed_by_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prefix = write_docs(tmp_path / "d", unique_docs(random_lengths(50, seed=4)))
    cache = tmp_path / "cache"
    args = dict(
        data_path=prefix, split="9,1,0", seq_length=8, num_samples=(100, 10, 0), seed=1, cache_dir=cache
    )
    first = build_pretrain_datasets(**args)
    assert (
        "building" in capsys.readouterr().err and first[0].index_built and first[1].index_built
    )  # logs: stderr
    files = cache_files(cache)
    assert len(files) == 6  # doc/sample/shuffle index for train and valid
    second = build_pretrain_datasets(**args)
    err = capsys.readouterr().err
    assert "building" not in err and err.count("reusing") == 2
    assert not second[0].index_built and cache_files(cache) == files
    assert isinstance(second[0].shuffle_idx, np.memmap)
    np.testing.assert_array_equal(first[0].shuffle_idx, second[0].shuffle_idx)
    description = json.loads(next(cache.glob("gpt_*.json")).read_text())
    assert description["seq_length"] == 8 and description["seed"] == 1

    # the train index does not depend on what the other splits ask for
    args["num_samples"] = (100, 0, 0)
    assert not build_pretrain_datasets(**args)[0].index_built
    seen = set(files)
    for change in (dict(seq_length=16), dict(seed=2), dict(split="8,2,0"), dict(num_samples=(120, 10, 0))):
        train, _, _ = build_pretrain_datasets(**{**args, **change})
        assert train.index_built, change
        new = set(cache_files(cache)) - seen
        assert len(new) == 3, change  # a fresh train index
        seen |= new
    # touching the data file changes its identity, so the index is rebuilt
    os.utime(prefix + ".bin", ns=(0, 1_000_000_000))
    assert build_pretrain_datasets(**args)[0].index_built


def test_same_seed_same_samples_in_separate_caches(tmp_path: Path) -> None:
    prefixes = [
        write_docs(tmp_path / f"p{c}", unique_docs(random_lengths(30, seed=10 + c))) for c in range(2)
    ]
    blend = [1, prefixes[0], 1, prefixes[1]]
    a = build_pretrain_datasets(blend, "9,1,0", 8, (200, 20, 0), seed=9, cache_dir=tmp_path / "a")
    b = build_pretrain_datasets(blend, "9,1,0", 8, (200, 20, 0), seed=9, cache_dir=tmp_path / "b")
    c = build_pretrain_datasets(blend, "9,1,0", 8, (200, 20, 0), seed=10, cache_dir=tmp_path / "c")
    for x, y in ((a[0], b[0]), (a[1], b[1])):
        assert x.index_built and y.index_built and len(x) == len(y)
        for i in range(len(x)):
            np.testing.assert_array_equal(x[i]["tokens"], y[i]["tokens"])
    assert any(not np.array_equal(a[0][i]["tokens"], c[0][i]["tokens"]) for i in range(len(a[0])))


def test_default_cache_dir_and_unwritable_cache_dir(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    prefix = write_docs(tmp_path / "data" / "d", unique_docs([20] * 5))
    build_pretrain_datasets(prefix, "1,0,0", 8, (5, 0, 0), seed=0)
    assert len(list((tmp_path / "data" / "cache").glob("*.npy"))) == 3
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    with pytest.raises(ValueError, match="not_a_dir"):
        build_pretrain_datasets(prefix, "1,0,0", 8, (5, 0, 0), seed=0, cache_dir=blocker / "cache")


def _concurrent_worker(prefix: str, cache_dir: str, barrier: Any, queue: Any) -> None:
    barrier.wait()
    train, valid, _ = build_pretrain_datasets(
        prefix, "95,5,0", 8, (300_000, 1000, 0), seed=3, cache_dir=cache_dir
    )
    digest = hashlib.sha256()
    for i in range(0, len(train), 1009):
        digest.update(train[i]["tokens"].tobytes())
    queue.put((train.index_built, valid.index_built, len(train), digest.hexdigest()))


@pytest.mark.distributed
def test_two_processes_build_once_and_agree(tmp_path: Path) -> None:
    prefix = write_docs(tmp_path / "d", unique_docs(random_lengths(20_000, seed=6, high=60)))
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    procs = [
        ctx.Process(target=_concurrent_worker, args=(prefix, str(tmp_path / "cache"), barrier, queue))
        for _ in range(2)
    ]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert sorted(r[0] for r in results) == [False, True]  # exactly one built the train index
    assert sorted(r[1] for r in results) == [False, True]
    assert results[0][2:] == results[1][2:]
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 6
    assert not list((tmp_path / "cache").glob(".*.tmp"))


# ---------------------------------------------------------------------------------------------- real data


def test_real_corpus_with_mixtral_tokenizer(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(MIXTRAL_TOKENIZER)
    lines = CORPUS_EN.read_text(encoding="utf-8").splitlines()
    texts = [json.loads(line)["text"] for line in lines[:300]]
    docs = [np.array(ids + [tokenizer.eos_token_id]) for ids in tokenizer(texts)["input_ids"]]
    prefix = write_docs(tmp_path / "debian_text_document", docs, np.uint16)
    assert IndexedDataset(prefix).dtype == np.uint16
    train, valid, test = build_pretrain_datasets(
        prefix, "90,6,4", 256, (150, 30, 10), seed=1234, cache_dir=tmp_path / "cache"
    )
    assert (train.doc_range, valid.doc_range, test.doc_range) == ((0, 270), (270, 288), (288, 300))
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    for ds in (train, valid, test):
        check_samples_against_stream(ds)
        for i in range(len(ds)):
            tokens, starts = ds[i]["tokens"], ds[i]["doc_starts"]
            # every document starts with BOS right after the previous one's EOD, and only there
            inner = starts[starts > 0]
            assert (tokens[inner] == bos).all() and (tokens[inner - 1] == eos).all()
            assert set(np.flatnonzero(tokens[:-1] == bos).tolist()) <= set(starts.tolist())
    text = tokenizer.decode(train[0]["tokens"].tolist())
    assert len(text) > 200 and "Debian" in "".join(
        tokenizer.decode(valid[i]["tokens"].tolist()) for i in range(len(valid))
    )
