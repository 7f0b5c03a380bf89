"""`moe-recipes inspect` (samples as the trainer sees them) and `moe-recipes index` (chat JSONL offset index).

Registered by `moe_recipes.cli` through `add_commands`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from typing import Any

# Markers around trained tokens in the text view (ANSI colours are not used so the output can be piped).
TRAIN_OPEN, TRAIN_CLOSE = "[[", "]]"


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register `moe-recipes inspect` and `moe-recipes index`."""
    p = sub.add_parser(
        "inspect",
        help="print training samples as the trainer will see them",
        description="Build the training data of CONFIG (pre-training or chat) exactly as `train` does and "
        "print samples: the decoded text with the trained tokens (labels != -100) between "
        f"{TRAIN_OPEN} and {TRAIN_CLOSE} and '|' where position ids restart, or with --json one JSON object "
        "per sample with input_ids, labels and position_ids.",
    )
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    p.add_argument("--index", type=int, default=0, metavar="I", help="first training sample (default: 0)")
    p.add_argument("--count", type=int, default=1, metavar="N", help="how many samples (default: 1)")
    p.add_argument("--json", action="store_true", help="one JSON object per sample line")
    p.set_defaults(handler=_run_inspect)

    q = sub.add_parser(
        "index",
        help="write the offset index of chat JSONL, Parquet or Arrow files",
        description="Write (or refresh) the offset index of each chat file into .index_cache/ beside "
        "it, so training opens the file at once and reads conversations by seeking (JSONL: byte offsets; "
        "Parquet/Arrow: row group or record batch and row). The index is rebuilt whenever the file "
        "changes; training builds it too when missing.",
    )
    q.add_argument("files", nargs="+", metavar="FILE")
    q.add_argument(
        "--skip-bad-lines",
        action="store_true",
        help="leave out and count invalid lines (default: stop with an error naming the file and line)",
    )
    q.add_argument("--force", action="store_true", help="rebuild even when the index is up to date")
    q.set_defaults(handler=_run_index)


def _run_index(args: argparse.Namespace) -> int:
    from moe_recipes.data.chat import build_index, index_paths

    for path in args.files:
        info = build_index(path, skip_bad_lines=args.skip_bad_lines, force=args.force)
        state = "written" if info.rebuilt else "up to date"
        line = f"{path}: {info.conversations} conversations, index {state} ({index_paths(path)[0]})"
        if info.bad_lines:
            line += f"; {info.bad_lines} invalid line(s) skipped, first: {info.first_error}"
        print(line)
    return 0


def _run_inspect(args: argparse.Namespace) -> int:
    from moe_recipes.config import load_config
    from moe_recipes.data.factory import build_training_data

    cfg = load_config(args.config, args.overrides)
    if args.index < 0 or args.count < 1:
        raise ValueError(f"--index must be >= 0 and --count >= 1, got {args.index} and {args.count}")
    data = build_training_data(cfg)
    tokenizer = None if args.json else _tokenizer(cfg)
    for i in range(args.index, args.index + args.count):
        batch = data.collate([data.train[i]])
        sample = sample_record(batch)
        if args.json:
            print(json.dumps({"index": i, **sample}))
        else:
            print(
                f"--- sample {i}: {len(sample['input_ids'])} tokens, "
                f"{sum(x != -100 for x in sample['labels'])} trained ---"
            )
            print(render_sample(tokenizer, sample))
    sys.stdout.flush()
    return 0


def _tokenizer(cfg: Any) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(cfg.model.path)


def sample_record(batch: dict[str, Any]) -> dict[str, list[int]]:
    """Row 0 of a collated batch as lists: input_ids, labels, position_ids (0..n-1 when the batch has none),
    with padding (attention_mask 0) cut off."""
    ids = batch["input_ids"][0]
    n = int(batch["attention_mask"][0].sum()) if "attention_mask" in batch else len(ids)
    if "position_ids" in batch:
        positions = batch["position_ids"][0][:n].tolist()
    else:
        positions = list(range(n))
    return {
        "input_ids": ids[:n].tolist(),
        "labels": batch["labels"][0][:n].tolist(),
        "position_ids": positions,
    }


def _groups(sample: dict[str, list[int]]) -> Iterator[tuple[list[int], bool, bool]]:
    """Runs of tokens as (tokens, trained, starts a sequence), sequence by sequence (positions restart).

    A sequence's tokens are its inputs plus its last target (e.g. the end-of-turn token, which is a target
    but never an input); token t+1 of it is trained when labels[t] != -100, its first token never is.
    """
    ids, labels, pos = sample["input_ids"], sample["labels"], sample["position_ids"]
    starts = [t for t, p in enumerate(pos) if p == 0 or t == 0] + [len(ids)]
    for a, b in zip(starts, starts[1:]):
        tokens = ids[a:b] + ([labels[b - 1]] if labels[b - 1] != -100 else [])
        trained = [False] + [lab != -100 for lab in labels[a:b]][: len(tokens) - 1]
        run: list[int] = []
        first = True
        for t, tok in enumerate(tokens):
            if run and trained[t] != trained[t - 1]:
                yield run, trained[t - 1], first
                run, first = [], False
            run.append(tok)
        yield run, trained[-1], first


def render_sample(tokenizer: Any, sample: dict[str, list[int]]) -> str:
    """Decoded text of a sample, trained runs wrapped in TRAIN_OPEN/TRAIN_CLOSE, '|' where positions restart.

    Each run is decoded after the token before it and that token's text removed, so word-initial spaces
    survive the cut (SentencePiece drops a leading space when a run is decoded alone).
    """
    out, prev = [], None
    for run, trained, new_seq in _groups(sample):
        if prev is None:
            text = tokenizer.decode(run)
        else:
            text = tokenizer.decode([prev, *run])[len(tokenizer.decode([prev])) :]
        if new_seq and out:
            out.append("|")
        out.append(f"{TRAIN_OPEN}{text}{TRAIN_CLOSE}" if trained else text)
        prev = run[-1]
    return "".join(out)
