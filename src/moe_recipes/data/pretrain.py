"""Pre-training samples: document splits, fixed-length windows, blends and the cached sample index.

The scheme follows Megatron-LM's GPTDataset + BlendedDataset, so runs are comparable with it:

* Each prefix's documents (one sequence of the .idx = one document) are cut into contiguous
  train/valid/test ranges by the split fractions (`split_document_ranges`).
* The documents of a range are shuffled once per epoch and concatenated; samples are windows of
  `seq_length + 1` tokens over that stream, consecutive samples overlapping by one token (the last
  label of sample k is the first input of sample k+1). Nothing is inserted between documents: they
  already end with EOD when prepared with `--append-eod`.
* As many epochs as the requested number of samples needs are laid out, then the sample order is
  shuffled. When the last epoch contributes < 80 % of an epoch, it is shuffled separately and put
  last, so the full epochs are seen before any part of the partial one (Megatron does the same).
* Blends `[w1, p1, w2, p2, ...]` interleave components deterministically in proportion to the weights.
* The index arrays (document order, sample boundaries, shuffle order, blend order) are built once per
  set of inputs, saved as .npy in a cache folder and memory-mapped afterwards; concurrent processes
  coordinate with an `fcntl.flock` file lock so exactly one builds.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moe_recipes.data.indexed import IndexedDataset, bin_path, idx_path

SPLIT_NAMES = ("train", "valid", "test")
# Part of every cache key: bump it whenever the way an index is built changes, so stale caches are ignored.
INDEX_VERSION = 1
# Megatron's safety margin on the samples each blend component builds.
BLEND_OVERSAMPLE = 1.005
# A partial last epoch smaller than this fraction of an epoch is shuffled apart from the full epochs.
SEPARATE_LAST_EPOCH_BELOW = 0.8

Sample = dict[str, np.ndarray]


# ----------------------------------------------------------------------------------------------------------
# Parsing
# ----------------------------------------------------------------------------------------------------------


def parse_data_path(path: str | os.PathLike | Sequence[Any]) -> list[tuple[float, str]]:
    """Turn a data path into normalised `(weight, prefix)` pairs.

    Accepts a single prefix (`"data/x_text_document"` or `["data/x_text_document"]`) or a Megatron-style
    blend `[w1, p1, w2, p2, ...]` (weights may be numbers or numeric strings). Weights are normalised to
    sum to 1. Raises ValueError for malformed lists and FileNotFoundError for prefixes whose .bin or .idx
    is missing.
    """
    items = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not items:
        raise ValueError("data_path is empty: give a prefix or a list [weight, prefix, weight, prefix, ...]")
    if len(items) == 1:
        pairs = [(1.0, items[0])]
    else:
        if len(items) % 2:
            raise ValueError(
                f"data_path has {len(items)} entries {items!r}: expected one prefix or pairs "
                "[weight, prefix, weight, prefix, ...]"
            )
        pairs = [(_parse_weight(items[k], k), items[k + 1]) for k in range(0, len(items), 2)]
    total = sum(w for w, _ in pairs)
    return [(w / total, _check_prefix(p)) for w, p in pairs]


def _parse_weight(value: Any, position: int) -> float:
    """A blend weight: a finite number > 0 (numeric strings allowed, booleans not)."""
    try:
        if isinstance(value, bool):
            raise TypeError
        weight = float(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"data_path entry {position} ({value!r}) is not a weight: a blend is [weight, prefix, ...]"
        ) from None
    if not math.isfinite(weight) or weight <= 0:
        raise ValueError(f"data_path weight at entry {position} must be > 0, got {value!r}")
    return weight


def _check_prefix(prefix: Any) -> str:
    """Check that PREFIX.bin and PREFIX.idx exist; return the prefix as a string."""
    if not isinstance(prefix, (str, os.PathLike)):
        raise ValueError(f"data_path prefix must be a path, got {prefix!r}")
    prefix = os.path.expanduser(os.fspath(prefix))
    missing = [str(p) for p in (bin_path(prefix), idx_path(prefix)) if not p.is_file()]
    if missing:
        hint = " (give the prefix without .bin/.idx)" if prefix.endswith((".bin", ".idx")) else ""
        raise FileNotFoundError(f"data prefix {prefix!r}: missing {', '.join(missing)}{hint}")
    return prefix


def parse_split(split: str) -> tuple[float, float, float]:
    """Parse a Megatron split string such as "949,50,1" into train/valid/test fractions summing to 1.

    Parts may be separated by "," or "/"; missing parts count as 0 ("98,2" == "98,2,0").
    """
    if not isinstance(split, str):
        raise ValueError(f"split must be a string such as '949,50,1', got {split!r}")
    parts = [p.strip() for p in split.replace("/", ",").split(",")]
    if len(parts) > 3 or any(not p for p in parts):
        raise ValueError(f"split {split!r}: expected up to three comma-separated numbers such as '949,50,1'")
    values = []
    for part in parts:
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"split {split!r}: {part!r} is not a number") from None
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"split {split!r}: {part!r} must be a finite number >= 0")
        values.append(value)
    values += [0.0] * (3 - len(values))
    total = sum(values)
    if total <= 0:
        raise ValueError(f"split {split!r}: the parts sum to 0")
    return (values[0] / total, values[1] / total, values[2] / total)


def split_document_ranges(num_docs: int, fractions: Sequence[float]) -> list[tuple[int, int]]:
    """Contiguous [start, end) document ranges for the split fractions.

    Boundaries are the cumulative fractions times `num_docs`, rounded half up, and the last is always
    `num_docs`; so "949,50,1" on 1000 documents gives (0, 949), (949, 999), (999, 1000). (Megatron rounds
    each part and then shifts the boundaries by the rounding excess; results differ by at most a document.)
    """
    bounds, acc = [0], 0.0
    for fraction in fractions:
        acc += fraction
        bounds.append(min(num_docs, max(bounds[-1], math.floor(acc * num_docs + 0.5))))
    bounds[-1] = num_docs
    return list(zip(bounds[:-1], bounds[1:]))


# ----------------------------------------------------------------------------------------------------------
# Index building (pure numpy, no per-token Python)
# ----------------------------------------------------------------------------------------------------------


def _index_dtype(max_value: int) -> type[np.signedinteger]:
    """int32 when every value fits (halves the cache and its page-cache footprint), else int64."""
    return np.int32 if max_value < np.iinfo(np.int32).max else np.int64


def plan_epochs(tokens_per_epoch: int, seq_length: int, num_samples: int) -> tuple[int, int, int]:
    """How many epochs `num_samples` windows need; returns (epochs, samples built, separate-from).

    `samples built` = all windows the laid-out epochs hold (>= num_samples). Samples from index
    `separate-from` on belong to a small partial last epoch and are shuffled apart; it equals
    `samples built` when nothing is separated.
    """
    # Windows of seq_length + 1 tokens stepping by seq_length: E epochs hold (E * T - 1) // L of them.
    num_epochs = max(1, -(-(num_samples * seq_length + 1) // tokens_per_epoch))
    total = (num_epochs * tokens_per_epoch - 1) // seq_length
    separate_from = total
    if num_epochs > 1:
        full_epoch_samples = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_length
        needed_from_last = num_samples - full_epoch_samples
        if needed_from_last < SEPARATE_LAST_EPOCH_BELOW * tokens_per_epoch / seq_length:
            separate_from = full_epoch_samples
    return num_epochs, total, separate_from


def build_doc_idx(doc_range: tuple[int, int], num_epochs: int, rng: np.random.RandomState) -> np.ndarray:
    """Document order: one fresh permutation of the range's documents per epoch, concatenated."""
    start, end = doc_range
    docs = np.arange(start, end, dtype=_index_dtype(end))
    return np.concatenate([rng.permutation(docs) for _ in range(num_epochs)])


def build_sample_idx(sizes: np.ndarray, doc_idx: np.ndarray, seq_length: int, num_samples: int) -> np.ndarray:
    """Sample boundaries, shape (num_samples + 1, 2): row k = (position in doc_idx, token offset).

    Sample k spans the stream from row k to row k+1, both ends included (seq_length + 1 tokens).
    """
    lengths = sizes[doc_idx].astype(np.int64)
    cum = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=cum[1:])
    starts = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    if starts[-1] >= cum[-1]:
        raise AssertionError(
            f"{num_samples} samples of {seq_length} tokens exceed the {cum[-1]}-token stream"
        )
    # side="right" maps a position on a document boundary to the document that starts there (skipping
    # empty documents), so an offset is always inside its document.
    pos = np.searchsorted(cum, starts, side="right") - 1
    offsets = starts - cum[pos]
    out = np.empty((num_samples + 1, 2), dtype=_index_dtype(max(len(doc_idx), int(sizes.max(initial=0)))))
    out[:, 0], out[:, 1] = pos, offsets
    return out


def build_shuffle_idx(num_samples: int, separate_from: int, rng: np.random.RandomState) -> np.ndarray:
    """Sample order: [0, separate_from) shuffled, then [separate_from, num_samples) shuffled."""
    dtype = _index_dtype(num_samples)
    first = rng.permutation(np.arange(separate_from, dtype=dtype))
    if separate_from == num_samples:
        return first
    return np.concatenate([first, rng.permutation(np.arange(separate_from, num_samples, dtype=dtype))])


def build_gpt_index(
    sizes: np.ndarray, doc_range: tuple[int, int], seq_length: int, num_samples: int, seed: int
) -> dict[str, np.ndarray]:
    """All index arrays of one component: doc_idx, sample_idx and shuffle_idx (see the module docstring)."""
    start, end = doc_range
    tokens_per_epoch = int(sizes[start:end].sum(dtype=np.int64))
    if tokens_per_epoch <= 0:
        raise ValueError(f"documents {start}..{end} hold no tokens")
    num_epochs, total, separate_from = plan_epochs(tokens_per_epoch, seq_length, num_samples)
    rng = np.random.RandomState(seed)  # legacy generator: its stream is frozen across numpy versions
    doc_idx = build_doc_idx(doc_range, num_epochs, rng)
    sample_idx = build_sample_idx(sizes, doc_idx, seq_length, total)
    shuffle_idx = build_shuffle_idx(total, separate_from, rng)
    return {"doc_idx": doc_idx, "sample_idx": sample_idx, "shuffle_idx": shuffle_idx}


def blend_component_samples(weights: Sequence[float], num_samples: int) -> list[int]:
    """Samples each blend component must provide: ceil(w * n * 1.005), plus the component count to cover
    the interleaving's rounding (each prefix of the blend is within k/2 samples of its target)."""
    return [math.ceil(w * num_samples * BLEND_OVERSAMPLE) + len(weights) for w in weights]


def build_blend_index(weights: Sequence[float], num_samples: int) -> dict[str, np.ndarray]:
    """Deterministic interleaving of components in proportion to `weights`.

    Component c's j-th sample is due at time (j + 0.5) / w_c; samples are taken in order of due time
    (ties -> lower component). This is the vectorised form of "take from the component most behind its
    target": any prefix of i samples holds w_c * i samples of component c to within k/2 (k components).
    Megatron's loop maximises the absolute deficit w_c * i - count_c instead, one sample at a time; this
    one needs one argsort instead of a Python loop over millions of samples.
    Returns dataset_index (component per sample) and sample_index (sample within that component).
    """
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    due_counts = np.ceil(w * num_samples).astype(np.int64) + len(w)
    component = np.repeat(np.arange(len(w), dtype=np.int64), due_counts)
    first = np.repeat(np.cumsum(due_counts) - due_counts, due_counts)
    within = np.arange(len(component), dtype=np.int64) - first
    order = np.argsort((within + 0.5) / w[component], kind="stable")[:num_samples]
    return {
        "dataset_index": component[order].astype(np.int16),
        "sample_index": within[order].astype(_index_dtype(int(due_counts.max()))),
    }


# ----------------------------------------------------------------------------------------------------------
# Cache
# ----------------------------------------------------------------------------------------------------------


def _file_identity(prefix: str) -> dict[str, Any]:
    """What identifies the data behind a prefix for the cache: absolute paths, sizes and mtimes."""
    out: dict[str, Any] = {}
    for path in (bin_path(prefix), idx_path(prefix)):
        stat = path.stat()
        out[str(path.resolve())] = [stat.st_size, stat.st_mtime_ns]
    return out


def _ensure_writable(cache_dir: Path) -> None:
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(
            f"cache_dir {cache_dir} cannot be created ({err}); set cache_dir to a writable folder"
        ) from err
    if not os.access(cache_dir, os.W_OK | os.X_OK):
        raise ValueError(f"cache_dir {cache_dir} is not writable; set cache_dir to a writable folder")


def _atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    """Write through a temporary file in the same folder, then rename: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_or_build_index(
    cache_dir: Path,
    key: dict[str, Any],
    names: Sequence[str],
    build: Callable[[], dict[str, np.ndarray]],
    label: str,
) -> tuple[dict[str, np.ndarray], bool]:
    """Memory-map the cached arrays for `key`, building them first if absent; returns (arrays, built).

    The file names carry a hash of `key` (everything the arrays depend on). Builders take an exclusive
    `fcntl.flock` on a .lock file in `cache_dir` and re-check after acquiring it, so of several processes
    (same machine, or a shared file system with working locks) one builds and the others wait and load.
    """
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    stem = f"{key['kind']}_{digest}"
    paths = {name: cache_dir / f"{stem}_{name}.npy" for name in names}
    built = False
    if not all(p.is_file() for p in paths.values()):
        _ensure_writable(cache_dir)
        with open(cache_dir / f"{stem}.lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if not all(p.is_file() for p in paths.values()):
                    print(
                        f"[moe-recipes] building sample index for {label} in {cache_dir}/{stem}_*",
                        file=sys.stderr,
                        flush=True,
                    )
                    t0 = time.perf_counter()
                    arrays = build()
                    for name, path in paths.items():
                        _atomic_write(path, lambda f, a=arrays[name]: np.save(f, a, allow_pickle=False))
                    text = json.dumps({**key, "build_seconds": round(time.perf_counter() - t0, 3)}, indent=1)
                    _atomic_write(cache_dir / f"{stem}.json", lambda f: f.write(text.encode()))
                    built = True
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
    if not built:
        print(
            f"[moe-recipes] reusing sample index for {label} from {cache_dir}/{stem}_*",
            file=sys.stderr,
            flush=True,
        )
    return {name: np.load(path, mmap_mode="r", allow_pickle=False) for name, path in paths.items()}, built


# ----------------------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------------------


class SampleDataset:
    """Map-style dataset of pre-training samples (usable by torch's DataLoader).

    `ds[i]` is `{"tokens": int64 (seq_length + 1,), "doc_starts": int64 sorted positions in
    [0, seq_length) where a document starts inside tokens[:-1], 0 always included}`.
    `index_built` tells whether this process built the cached index (False: loaded from the cache).
    """

    seq_length: int
    index_built: bool
    cache_key: dict[str, Any]

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, i: int) -> Sample:
        raise NotImplementedError

    def _check_index(self, i: int) -> int:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples")
        return i


class PretrainDataset(SampleDataset):
    """Windows of seq_length + 1 tokens over the shuffled documents `doc_range` of one indexed dataset."""

    def __init__(
        self,
        indexed: IndexedDataset,
        split_name: str,
        doc_range: tuple[int, int],
        seq_length: int,
        num_samples: int,
        seed: int,
        cache_dir: Path,
    ):
        self.indexed, self.split_name, self.doc_range = indexed, split_name, doc_range
        self.seq_length, self.num_samples, self.seed = seq_length, num_samples, seed
        self.cache_key = {
            "kind": "gpt",
            "version": INDEX_VERSION,
            "files": _file_identity(indexed.prefix),
            "split": split_name,
            "doc_range": list(doc_range),
            "seq_length": seq_length,
            "num_samples": num_samples,
            "seed": seed,
        }
        label = f"{split_name} split of {Path(indexed.prefix).name} ({num_samples} x {seq_length}+1 tokens)"
        arrays, self.index_built = load_or_build_index(
            cache_dir,
            self.cache_key,
            ("doc_idx", "sample_idx", "shuffle_idx"),
            lambda: build_gpt_index(indexed.sizes, doc_range, seq_length, num_samples, seed),
            label,
        )
        self.doc_idx, self.sample_idx, self.shuffle_idx = (
            arrays["doc_idx"],
            arrays["sample_idx"],
            arrays["shuffle_idx"],
        )

    def __len__(self) -> int:
        return len(self.shuffle_idx)

    def __getitem__(self, i: int) -> Sample:
        return self.unshuffled_sample(int(self.shuffle_idx[self._check_index(i)]))

    def unshuffled_sample(self, k: int) -> Sample:
        """Window k of the document stream (before the sample shuffle)."""
        (p0, o0), (p1, o1) = (int(x) for x in self.sample_idx[k]), (int(x) for x in self.sample_idx[k + 1])
        docs = self.doc_idx[p0 : p1 + 1]
        lengths = self.indexed.sizes[docs].astype(np.int64)
        lengths[0] -= o0
        lengths[-1] = o1 + 1 - (o0 if p0 == p1 else 0)
        tokens = np.empty(self.seq_length + 1, dtype=np.int64)
        pos = 0
        for j, (doc, n) in enumerate(zip(docs.tolist(), lengths.tolist())):
            tokens[pos : pos + n] = self.indexed.get(doc, o0 if j == 0 else 0, n)
            pos += n
        if pos != self.seq_length + 1:
            raise AssertionError(f"sample {k} has {pos} tokens, expected {self.seq_length + 1}")
        starts = np.cumsum(lengths[:-1])
        doc_starts = np.unique(np.concatenate([[0], starts[starts < self.seq_length]]))
        return {"tokens": tokens, "doc_starts": doc_starts.astype(np.int64)}


class BlendedDataset(SampleDataset):
    """Samples drawn from several datasets in proportion to their weights (see `build_blend_index`)."""

    def __init__(
        self,
        datasets: Sequence[SampleDataset],
        weights: Sequence[float],
        num_samples: int,
        cache_dir: Path,
        label: str,
    ):
        self.datasets, self.weights, self.num_samples = list(datasets), list(weights), num_samples
        self.seq_length = self.datasets[0].seq_length
        self.cache_key = {
            "kind": "blend",
            "version": INDEX_VERSION,
            "components": [d.cache_key for d in self.datasets],
            "weights": self.weights,
            "num_samples": num_samples,
        }
        arrays, self.index_built = load_or_build_index(
            cache_dir, self.cache_key, ("dataset_index", "sample_index"), self._build, label
        )
        self.dataset_index, self.sample_index = arrays["dataset_index"], arrays["sample_index"]

    def _build(self) -> dict[str, np.ndarray]:
        arrays = build_blend_index(self.weights, self.num_samples)
        counts = np.bincount(arrays["dataset_index"], minlength=len(self.datasets))
        for ds, count in zip(self.datasets, counts):
            if count > len(ds):
                raise AssertionError(f"blend needs {count} samples of a component that has {len(ds)}")
        return arrays

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, i: int) -> Sample:
        i = self._check_index(i)
        return self.datasets[int(self.dataset_index[i])][int(self.sample_index[i])]


def build_pretrain_datasets(
    data_path: str | os.PathLike | Sequence[Any],
    split: str,
    seq_length: int,
    num_samples: Sequence[int],
    seed: int,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[SampleDataset | None, SampleDataset | None, SampleDataset | None]:
    """Train/valid/test datasets with at least `num_samples[i]` samples of `seq_length + 1` tokens each.

    A split with 0 requested samples, or without tokens in any prefix, is None. `cache_dir` defaults to
    a `cache` folder next to the first prefix.
    """
    if isinstance(seq_length, bool) or not isinstance(seq_length, int) or seq_length <= 0:
        raise ValueError(f"seq_length must be a positive integer, got {seq_length!r}")
    if len(num_samples) != 3 or any(
        isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0 for n in num_samples
    ):
        raise ValueError(f"num_samples must be three integers >= 0 (train, valid, test), got {num_samples!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    blend = parse_data_path(data_path)
    fractions = parse_split(split)
    cache = Path(cache_dir) if cache_dir is not None else Path(blend[0][1]).parent / "cache"
    indexed = {prefix: IndexedDataset(prefix) for _, prefix in blend}
    out: list[SampleDataset | None] = []
    for s in range(len(SPLIT_NAMES)):
        n = int(num_samples[s])
        out.append(_build_split(blend, indexed, fractions, s, seq_length, n, int(seed), cache) if n else None)
    return out[0], out[1], out[2]


def _build_split(
    blend: list[tuple[float, str]],
    indexed: dict[str, IndexedDataset],
    fractions: Sequence[float],
    s: int,
    seq_length: int,
    num_samples: int,
    seed: int,
    cache: Path,
) -> SampleDataset | None:
    """One split: a PretrainDataset, or a BlendedDataset over the prefixes that have tokens in it."""
    name = SPLIT_NAMES[s]
    parts = []
    for weight, prefix in blend:
        ds = indexed[prefix]
        doc_range = split_document_ranges(len(ds), fractions)[s]
        if int(ds.sizes[doc_range[0] : doc_range[1]].sum(dtype=np.int64)) > 0:
            parts.append((weight, ds, doc_range))
        elif len(blend) > 1:
            print(
                f"[moe-recipes] {name} split: {prefix} has no tokens in it; left out of the blend",
                file=sys.stderr,
                flush=True,
            )
    if not parts:
        return None
    if len(parts) == 1:
        _, ds, doc_range = parts[0]
        return PretrainDataset(ds, name, doc_range, seq_length, num_samples, seed, cache)
    total = sum(w for w, _, _ in parts)
    weights = [w / total for w, _, _ in parts]
    components = [
        PretrainDataset(ds, name, doc_range, seq_length, n, seed, cache)
        for (_, ds, doc_range), n in zip(parts, blend_component_samples(weights, num_samples))
    ]
    return BlendedDataset(components, weights, num_samples, cache, f"{name} blend of {len(parts)} datasets")
