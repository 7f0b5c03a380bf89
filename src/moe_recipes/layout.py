"""Where a training checkpoint keeps what: the one home of the layout, for training (which writes it, in
`train.checkpoint`) and `convert` (which reads it) alike.

    SAVE/latest                 the name of the newest complete checkpoint
    SAVE/iter_NNNNNNN/          a checkpoint: the engine's files, rng_state_rank{R}.pt, config.yaml,
                                hf_config/ (the base model's config and tokenizer files, HF_FILES) and,
                                written last, run_state.json, which lists every file with its size
    SAVE/iter_NNNNNNN.tmp/      a checkpoint being written (renamed when complete)
    SAVE/iter_NNNNNNN.resharded/  that checkpoint's DeepSpeed state in a layout any number of processes,
                                ZeRO stage and EP size can load (`train.reshard`), written on a resume that
                                changes them; complete when its resharded.json exists (`.tmp` while written)

A folder is a complete checkpoint when its run_state.json exists; `verify_checkpoint` checks that every
file it lists still has its recorded size.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

RUN_STATE = "run_state.json"
LATEST = "latest"
HF_CONFIG_DIR = "hf_config"
RESHARDED_SUFFIX = ".resharded"
RESHARDED_META = "resharded.json"

ITER_RE = re.compile(r"^iter_(\d{7,})$")
HF_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "LICENSE",
    "README.md",
)


def iter_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def resharded_dir(ckpt: Path) -> Path:
    """Where the resharded copy of checkpoint `ckpt` lives: next to it."""
    return ckpt.with_name(ckpt.name + RESHARDED_SUFFIX)


def list_checkpoints(save_dir: Path) -> list[Path]:
    """Complete checkpoints in `save_dir`, oldest first."""
    if not save_dir.is_dir():
        return []
    found = [p for p in save_dir.iterdir() if ITER_RE.match(p.name) and (p / "run_state.json").is_file()]
    return sorted(found, key=lambda p: int(ITER_RE.match(p.name).group(1)))  # type: ignore[union-attr]


def resolve_checkpoint(path: str | Path) -> Path | None:
    """`SAVE` (via its `latest` pointer) or `SAVE/iter_NNNNNNN` -> that complete checkpoint, else None.

    A complete checkpoint newer than `latest` (a crash between its rename and the `latest` update) is
    taken instead, with a message. Every file the checkpoint lists is checked for its size."""
    path = Path(path)
    if ITER_RE.match(path.name):
        if not (path / "run_state.json").is_file():
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no run_state.json)")
        verify_checkpoint(path)
        return path
    latest = path / "latest"
    if not latest.is_file():
        return None
    name = latest.read_text().strip()
    target = path / name
    if not ITER_RE.match(name) or not (target / "run_state.json").is_file():
        why = "does not exist" if not target.exists() else "is not a complete checkpoint (no run_state.json)"
        raise FileNotFoundError(f"{latest} names {name!r}, which {why}")
    newest = list_checkpoints(path)[-1]
    if _iteration(newest) > _iteration(target):
        print(
            f"[moe-recipes] {newest.name} is complete and newer than {latest} ({name}; the run stopped "
            f"before updating it): using {newest.name}",
            file=sys.stderr,
            flush=True,
        )
        target = newest
    verify_checkpoint(target)
    return target


def _iteration(ckpt: Path) -> int:
    return int(ITER_RE.match(ckpt.name).group(1))  # type: ignore[union-attr]


def verify_checkpoint(ckpt: Path) -> None:
    """Every file run_state.json lists exists with its recorded size; ValueError naming the first that
    does not (checkpoints written before the list was kept are not checked)."""
    try:
        state = json.loads((ckpt / "run_state.json").read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{ckpt / 'run_state.json'} is not valid JSON ({err})") from None
    for rel, size in state.get("files", {}).items():
        f = ckpt / rel
        if not f.is_file():
            raise ValueError(f"checkpoint {ckpt}: {rel} is missing (the checkpoint lists it, {size} bytes)")
        actual = f.stat().st_size
        if actual != size:
            raise ValueError(
                f"checkpoint {ckpt}: {f} is {actual} bytes, but was written with {size} bytes "
                "(damaged or only partly written); resume from an earlier checkpoint"
            )
