"""The real tokenizers and corpora the tests use: the one place that knows where they are.

All of them ship with the repository. The Mixtral tokenizer and the English corpus are the demo's
(`demo/`); the DeepSeek tokenizer and the Japanese corpus live beside this file, xz-compressed where
large (see README.md here). Importing this module

- checks that every shipped file is there: a missing one raises FileNotFoundError naming it (a test
  error, never a skip);
- unpacks the compressed ones into the git-ignored cache `.test-assets/`, once. A cached copy is
  reused while its stamp (in `.test-assets/.stamps/`) still matches the sha256 of the compressed
  file and the copy's size and mtime; otherwise it is written again. Every file is written under a
  temporary name and renamed into place, so parallel test processes and interrupted runs never see
  a half-written file.

Tests import the paths: `from tests.assets import MIXTRAL_TOKENIZER, CORPUS_JA` (or `..assets`).
"""

from __future__ import annotations

import hashlib
import lzma
import os
import shutil
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CACHE = REPO / ".test-assets"  # outside tests/, so searches of the test code skip the unpacked files
_STAMPS = CACHE / ".stamps"

# Used in place from the repository.
MIXTRAL_TOKENIZER = REPO / "demo" / "tokenizer"  # Mistral/Mixtral v1, 32000 ids, uint16 datasets
CORPUS_EN = REPO / "demo" / "corpus" / "debian-reference.en.jsonl"  # 399 documents
# Materialized from HERE into CACHE.
DEEPSEEK_TOKENIZER = CACHE / "tokenizers" / "deepseek"  # DeepSeek-V3, 129280 ids, int32 datasets
CORPUS_JA = CACHE / "corpus" / "debian-reference.ja.jsonl"  # 362 documents

IN_PLACE = (
    MIXTRAL_TOKENIZER / "tokenizer.json",
    MIXTRAL_TOKENIZER / "tokenizer_config.json",
    CORPUS_EN,
)
# Cached file -> the shipped file it is made from (unpacked when the name ends in .xz, else copied).
MATERIALIZED = {
    DEEPSEEK_TOKENIZER / "tokenizer.json": HERE / "tokenizers" / "deepseek" / "tokenizer.json.xz",
    DEEPSEEK_TOKENIZER / "tokenizer_config.json": HERE / "tokenizers" / "deepseek" / "tokenizer_config.json",
    CORPUS_JA: HERE / "corpus" / "debian-reference.ja.jsonl.xz",
}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_atomically(dest: Path, fill) -> None:
    """Call fill(binary file) on a temporary file beside dest, then rename it to dest."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)  # mkstemp makes it owner-only
            fill(f)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _materialize(dest: Path, source: Path) -> None:
    stamp = _STAMPS / dest.relative_to(CACHE).with_name(dest.name + ".stamp")
    source_hash = _sha256(source)

    def current() -> str:
        st = dest.stat()
        return f"{source_hash} {st.st_size} {st.st_mtime_ns}\n"

    try:
        if stamp.read_text() == current():
            return
    except OSError:  # no copy or no stamp yet
        pass

    def fill(out) -> None:
        opener = lzma.open if source.suffix == ".xz" else open
        with opener(source, "rb") as src:
            shutil.copyfileobj(src, out, 1 << 20)

    _write_atomically(dest, fill)
    _write_atomically(stamp, lambda out: out.write(current().encode()))


def _prepare() -> None:
    missing = [p for p in (*IN_PLACE, *MATERIALIZED.values()) if not p.is_file()]
    if missing:
        names = "\n  ".join(str(p.relative_to(REPO)) for p in missing)
        raise FileNotFoundError(
            f"test asset(s) missing from the repository at {REPO}:\n  {names}\n"
            "They are tracked in git (see tests/assets/README.md): restore them, e.g. `git checkout -- <path>`."
        )
    for dest, source in MATERIALIZED.items():
        _materialize(dest, source)


_prepare()
