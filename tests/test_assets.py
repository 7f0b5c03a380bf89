"""The shipped test assets are complete and load offline: both tokenizers, both corpora, the cache."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from . import assets
from .assets import CORPUS_EN, CORPUS_JA, DEEPSEEK_TOKENIZER, MIXTRAL_TOKENIZER

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("folder", "base_vocab", "total", "hello"),
    [
        (MIXTRAL_TOKENIZER, 32000, 32000, [1, 22557, 1526]),  # adds BOS itself
        (DEEPSEEK_TOKENIZER, 128000, 129280, [19923, 2058]),  # 128k BPE + 1280 added tokens, no BOS
    ],
    ids=["mixtral", "deepseek"],
)
def test_tokenizers_load_offline(folder: Path, base_vocab: int, total: int, hello: list[int]) -> None:
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    assert (tok.vocab_size, len(tok)) == (base_vocab, total)
    assert tok("Hello world").input_ids == hello
    assert tok.eos_token_id is not None and tok.chat_template


@pytest.mark.parametrize(("path", "count"), [(CORPUS_EN, 399), (CORPUS_JA, 362)], ids=["en", "ja"])
def test_corpora_have_every_document(path: Path, count: int) -> None:
    texts = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(texts) == count and all(texts)
    assert "GNU General Public License" in texts[0]  # the licence notice opens the book


def test_cache_is_inside_the_repository_and_ignored() -> None:
    for path in assets.MATERIALIZED:
        assert path.is_relative_to(REPO / ".test-assets")
    out = subprocess.run(
        ["git", "check-ignore", "-q", str(CORPUS_JA)], cwd=REPO, capture_output=True, check=False
    )
    if out.returncode == 128:  # not a git checkout (e.g. an exported tree): nothing to check
        return
    assert out.returncode == 0, ".test-assets/ must be git-ignored"


def _import_assets(repo: Path) -> subprocess.CompletedProcess:
    """Import a copy of the assets module whose repository root is `repo`, in a fresh interpreter."""
    return subprocess.run(
        [sys.executable, "-c", "import tests.assets"],
        cwd=repo,
        env={**os.environ, "PYTHONPATH": str(repo)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def _copy_repo_subset(root: Path) -> Path:
    """A minimal tree with what tests/assets needs: tests/__init__.py, tests/assets/, demo/."""
    shutil.copytree(
        REPO / "tests" / "assets", root / "tests" / "assets", ignore=shutil.ignore_patterns("__pycache__")
    )
    (root / "tests" / "__init__.py").write_text("")
    shutil.copytree(REPO / "demo" / "tokenizer", root / "demo" / "tokenizer")
    (root / "demo" / "corpus").mkdir(parents=True)
    os.link(CORPUS_EN, root / "demo" / "corpus" / CORPUS_EN.name)
    return root


def test_unpacks_once_and_again_when_stale(tmp_path: Path) -> None:
    root = _copy_repo_subset(tmp_path)
    assert _import_assets(root).returncode == 0
    cached = root / ".test-assets" / "corpus" / "debian-reference.ja.jsonl"
    assert cached.read_bytes() == CORPUS_JA.read_bytes()
    assert not list((root / ".test-assets").rglob("*.tmp"))
    mtime = cached.stat().st_mtime_ns
    assert _import_assets(root).returncode == 0
    assert cached.stat().st_mtime_ns == mtime  # reused, not written again
    cached.write_text("truncated")  # a damaged copy (size and mtime differ) is replaced
    assert _import_assets(root).returncode == 0
    assert cached.read_bytes() == CORPUS_JA.read_bytes()


def test_missing_asset_is_an_error_naming_it(tmp_path: Path) -> None:
    root = _copy_repo_subset(tmp_path)
    (root / "tests" / "assets" / "corpus" / "debian-reference.ja.jsonl.xz").unlink()
    out = _import_assets(root)
    assert out.returncode != 0
    assert "FileNotFoundError" in out.stderr
    assert "tests/assets/corpus/debian-reference.ja.jsonl.xz" in out.stderr
