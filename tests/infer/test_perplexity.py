"""Perplexity: the trainer's samples, a loss equal to plain cross-entropy on full logits, batch invariance."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from moe_recipes.cli import main
from moe_recipes.data.indexed import IndexedDataset
from moe_recipes.infer.perplexity import eval_dataset, evaluate_perplexity, one_epoch_samples

SEQ = 32
SPLIT = "80,20,0"


def test_loss_is_cross_entropy_of_the_full_logits(tmp_path, tiny_mixtral, tiny_dataset):
    cache = str(tmp_path / "cache")
    result = evaluate_perplexity(
        tiny_mixtral,
        tiny_dataset,
        seq_length=SEQ,
        split=SPLIT,
        max_samples=5,
        cache_dir=cache,
        batch_size=2,
        progress=False,
    )
    # independently: the same samples, the HF model's own forward, F.cross_entropy over all positions
    dataset, count = eval_dataset(tiny_dataset, SPLIT, SEQ, 1234, "valid", 5, cache)
    model = AutoModelForCausalLM.from_pretrained(tiny_mixtral).eval()
    tokens = torch.stack([torch.as_tensor(dataset[i]["tokens"]) for i in range(count)])
    with torch.no_grad():
        logits = model(input_ids=tokens[:, :-1]).logits
    expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)).item()
    assert result.loss == pytest.approx(expected, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(expected), rel=1e-4)
    assert (result.samples, result.tokens) == (5, 5 * SEQ)


def test_batch_size_does_not_change_the_result(tmp_path, tiny_mixtral, tiny_dataset):
    results = [
        evaluate_perplexity(
            tiny_mixtral,
            tiny_dataset,
            seq_length=SEQ,
            split=SPLIT,
            max_samples=5,
            batch_size=b,
            cache_dir=str(tmp_path / "cache"),
            progress=False,
        )
        for b in (1, 3)
    ]
    assert results[0].loss == pytest.approx(results[1].loss, rel=1e-6)


def test_default_is_one_pass_over_the_split(tmp_path, tiny_dataset):
    ds = IndexedDataset(tiny_dataset)
    start = math.floor(0.8 * len(ds) + 0.5)
    tokens = int(ds.sizes[start:].sum())
    assert one_epoch_samples(tiny_dataset, SPLIT, SEQ, "valid") == (tokens - 1) // SEQ
    dataset, count = eval_dataset(tiny_dataset, SPLIT, SEQ, 1234, "valid", None, str(tmp_path / "cache"))
    assert count == len(dataset) == (tokens - 1) // SEQ


def test_bad_arguments(tmp_path, tiny_mixtral, tiny_dataset):
    with pytest.raises(ValueError, match="which='dev'"):
        eval_dataset(tiny_dataset, SPLIT, SEQ, 1234, "dev", 4, str(tmp_path))
    with pytest.raises(ValueError, match="no test documents|fewer than"):
        evaluate_perplexity(
            tiny_mixtral,
            tiny_dataset,
            seq_length=SEQ,
            split=SPLIT,
            which="test",
            cache_dir=str(tmp_path),
            progress=False,
        )
    with pytest.raises(FileNotFoundError, match="missing"):
        evaluate_perplexity(tiny_mixtral, str(tmp_path / "nope"), seq_length=SEQ, progress=False)


def test_cli_eval(tmp_path, tiny_mixtral, tiny_dataset, capsys):
    args = [
        "eval",
        tiny_mixtral,
        "--data",
        tiny_dataset,
        "--seq-length",
        str(SEQ),
        "--split",
        SPLIT,
        "--max-samples",
        "3",
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    assert main(args) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    expected = evaluate_perplexity(
        tiny_mixtral,
        tiny_dataset,
        seq_length=SEQ,
        split=SPLIT,
        max_samples=3,
        cache_dir=str(tmp_path / "cache"),
        progress=False,
    )
    assert line == expected.summary("valid")


def test_auto_dtype_keeps_fp32_weights_on_cpu_as_training_does(tmp_path, tiny_mixtral, tiny_dataset):
    """On CPU `dtype=auto` under bf16 compute keeps fp32 weights (as the trainer's validation does), so eval
    reproduces a run's valid_loss; bf16 weights are a different model (their loss differs)."""
    common = dict(
        seq_length=SEQ, split=SPLIT, max_samples=2, cache_dir=str(tmp_path / "cache"), progress=False
    )
    runs = {
        dtype: evaluate_perplexity(
            tiny_mixtral, tiny_dataset, precision="bf16", device="cpu", dtype=dtype, **common
        )
        for dtype in ("auto", "fp32", "bf16")
    }
    assert runs["auto"].loss == runs["fp32"].loss
    assert runs["bf16"].loss != runs["fp32"].loss
