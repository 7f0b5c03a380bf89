"""`moe-recipes demo`: the whole job end to end on the bundled sample data, on CPU, in a few minutes.

1. tokenize the bundled corpus into an indexed dataset (`prepare`),
2. write a tiny randomly initialised Mixtral-architecture model (`init-model`),
3. continually pre-train it with `configs/demo.yaml` (validation loss should fall clearly),
4. convert the last checkpoint to a Hugging Face folder and generate a continuation (when available).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ASSETS = REPO / "demo"
DEMO_CONFIG = REPO / "configs" / "demo.yaml"


def _require_assets() -> None:
    for path in (ASSETS / "tokenizer" / "tokenizer.json", ASSETS / "corpus", DEMO_CONFIG):
        if not path.exists():
            raise FileNotFoundError(
                f"demo asset missing: {path} (run the demo from a checkout of the repository)"
            )


def run_demo(workdir: str | Path = "demo_out", iters: int | None = None) -> int:
    from moe_recipes.config import load_config
    from moe_recipes.data.prepare import prepare_dataset
    from moe_recipes.models.init import init_model
    from moe_recipes.train.trainer import train

    _require_assets()
    work = Path(workdir)
    tokenizer = ASSETS / "tokenizer"
    print(f"== 1/4 prepare: tokenizing {ASSETS / 'corpus'} ==", flush=True)
    stats = prepare_dataset(
        inputs=[str(ASSETS / "corpus" / "*.jsonl")],
        tokenizer_dir=str(tokenizer),
        output_prefix=str(work / "data" / "debian_en"),
        append_eod=True,
        workers=2,
    )
    print(stats.summary(), flush=True)
    print("== 2/4 init-model: tiny Mixtral (8 experts, top-2) ==", flush=True)
    base = init_model(
        arch="mixtral",
        tokenizer_dir=str(tokenizer),
        output_dir=str(work / "base_model"),
        hidden_size=128,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        num_experts=8,
        top_k=2,
        expert_intermediate_size=256,
        max_position_embeddings=1024,
        seed=0,
        overwrite=True,
    )
    print(f"base model: {base}", flush=True)
    print("== 3/4 train: continual pre-training on CPU ==", flush=True)
    overrides = [
        f"model.path={base}",
        f"data.path={work / 'data' / 'debian_en_text_document'}",
        f"log.dir={work / 'run'}",
        f"checkpoint.save={work / 'checkpoints'}",
        f"data.cache_dir={work / 'data' / 'cache'}",
    ]
    if iters is not None:
        overrides.append(f"train.iters={iters}")
    cfg = load_config(DEMO_CONFIG, overrides)
    rc = train(cfg)
    if rc != 0:
        return rc
    _report_valid_losses(work / "run" / "metrics.jsonl")
    print(
        f"checkpoints: {work / 'checkpoints'} (latest: {(work / 'checkpoints' / 'latest').read_text().strip()})"
    )
    rc = 0 if importlib.util.find_spec("moe_recipes.convert.hf") is None else _convert_and_generate(work)
    _print_plots(work / "run")
    return rc


def _print_plots(run_dir: Path) -> None:
    """Write the run's figures (`moe-recipes plot RUN_DIR`) and print their paths."""
    if importlib.util.find_spec("matplotlib") is None:
        print(f"plots: install matplotlib, then run `moe-recipes plot {run_dir}`", flush=True)
        return
    from moe_recipes.train.plot import plot_run

    print(f"== plots (moe-recipes plot {run_dir}) ==", flush=True)
    for path in plot_run(run_dir):
        print(f"plot: {path}", flush=True)


def _report_valid_losses(metrics: Path) -> None:
    import json

    losses = [json.loads(line) for line in metrics.read_text().splitlines()]
    valid = [(r["step"], r["valid_loss"]) for r in losses if "valid_loss" in r]
    if valid:
        print("validation loss by step: " + ", ".join(f"{s}: {v:.3f}" for s, v in valid), flush=True)


def _convert_and_generate(work: Path) -> int:
    from moe_recipes.convert.hf import convert_checkpoint
    from moe_recipes.infer.generate import generate_text

    print("== 4/4 convert + generate ==", flush=True)
    out = convert_checkpoint(str(work / "checkpoints"), output_dir=str(work / "hf_model"), overwrite=True)
    print(f"Hugging Face model: {out}", flush=True)
    text = generate_text(
        str(out),
        prompt="The Debian package management system",
        max_new_tokens=40,
        temperature=0.0,
        stream=True,
    )
    print(flush=True)
    return 0 if text is not None else 1
