"""Loading a Hugging Face tokenizer folder and reading the special ids that data code relies on.

Shared by `prepare` (tokenization), `data-info` (decoding samples) and the trainer (EOD id for
document boundaries), so that every part of the project resolves BOS/EOS the same way.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Any one of these makes a folder loadable by AutoTokenizer without a model config.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """Load the tokenizer stored in folder `path` (offline; nothing is fetched from a hub).

    Raises FileNotFoundError naming the folder when it does not exist or holds none of the usual
    tokenizer files, instead of transformers' attempt to treat the path as a hub repository id.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder not found: {folder}")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"no tokenizer in {folder}: expected one of {', '.join(TOKENIZER_FILES)}")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def eod_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The end-of-document id: the tokenizer's EOS token id. ValueError when it has none."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(
            f"tokenizer {tokenizer.name_or_path!r} has no eos_token: set eos_token in its "
            "tokenizer_config.json (needed to mark document ends)"
        )
    return int(eos)


def bos_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The BOS token id, or None when the tokenizer defines no BOS token."""
    bos = tokenizer.bos_token_id
    return None if bos is None else int(bos)
