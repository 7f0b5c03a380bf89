"""Test fixtures: tiny datasets and models made from the real tokenizers and corpora in tests/assets."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

# Importing the assets checks they are all there (an error naming any missing file) and unpacks them.
from .assets import CORPUS_EN, MIXTRAL_TOKENIZER

# Two cores: keep every test process to one or two threads.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """The first 80 English documents as JSONL."""
    out = tmp_path_factory.mktemp("corpus") / "en.jsonl"
    with open(CORPUS_EN) as src, open(out, "w") as dst:
        for i, line in enumerate(src):
            if i >= 80:
                break
            dst.write(json.dumps({"text": json.loads(line)["text"]}) + "\n")
    return out


@pytest.fixture(scope="session")
def tiny_dataset(tiny_corpus, tmp_path_factory) -> str:
    """Indexed dataset prefix of the tiny corpus, tokenized with the real Mixtral tokenizer."""
    from moe_recipes.data.prepare import prepare_dataset

    prefix = tmp_path_factory.mktemp("data") / "en"
    prepare_dataset(
        inputs=[str(tiny_corpus)],
        tokenizer_dir=str(MIXTRAL_TOKENIZER),
        output_prefix=str(prefix),
        append_eod=True,
        workers=1,
    )
    return f"{prefix}_text_document"


@pytest.fixture(scope="session")
def tiny_mixtral(tmp_path_factory) -> str:
    """A tiny random Mixtral (4 experts, top-2) with the real Mixtral tokenizer."""
    from moe_recipes.models.init import init_model

    out = tmp_path_factory.mktemp("models") / "mixtral"
    return init_model(
        arch="mixtral",
        tokenizer_dir=str(MIXTRAL_TOKENIZER),
        output_dir=str(out),
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        num_experts=4,
        top_k=2,
        expert_intermediate_size=64,
        max_position_embeddings=512,
        seed=0,
    )


EP_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3")


@pytest.fixture(scope="session")
def ep_models(tmp_path_factory) -> dict[str, str]:
    """One tiny model per family, 4 routed experts top-2 (DeepSeek-V3 with its group-limited routing)."""
    from moe_recipes.models.init import init_model

    root = tmp_path_factory.mktemp("ep_models")
    return {
        arch: init_model(
            arch=arch,
            tokenizer_dir=str(MIXTRAL_TOKENIZER),
            output_dir=str(root / arch),
            hidden_size=64,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            num_experts=4,
            top_k=2,
            expert_intermediate_size=32,
            max_position_embeddings=512,
            seed=0,
        )
        for arch in EP_FAMILIES
    }


@pytest.fixture(scope="session")
def zero3_two_processes(tmp_path_factory, tiny_mixtral, tiny_dataset) -> SimpleNamespace:
    """One 2-process ZeRO-3 run of the tiny Mixtral under torchrun (tests/train/utils.TWO_PROCESS_COMMON: 4
    steps, evaluated at steps 2 and 4), which saves its last step with the exported HF folder: `.dir` (its
    work folder, `run/` and `ckpt/` inside) and `.stdout`. The reference of the single-process and FSDP2
    comparisons and the checkpoint of the conversion tests, launched once per session."""
    from tests.harness import run_cli_distributed

    from .train.utils import TWO_PROCESS_COMMON, write_config

    work = tmp_path_factory.mktemp("zero3_two_processes")
    config = write_config(
        work,
        tiny_mixtral,
        tiny_dataset,
        *TWO_PROCESS_COMMON,
        "distributed.zero_stage=3",
        f"checkpoint.save={work / 'ckpt'}",
        "checkpoint.save_hf=true",
    )
    out = run_cli_distributed(["train", str(config)], world_size=2, launcher="torchrun", timeout=600)
    return SimpleNamespace(dir=work, stdout=out.stdout)
