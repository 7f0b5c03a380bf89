"""`generate` and `eval` with `--device-map auto` (accelerate's placement) give the one-device results.

On a machine without a GPU accelerate places the whole model on the CPU, or, within a `max_memory` smaller
than the model, offloads it to disk and runs each module on the CPU through its hooks: then the weights sit on
``meta`` between uses, and the inputs must go to the device the embedding runs on, not to where its weights
are. The model here is the tiny Mixtral with its LM head scaled up, so its losses depend strongly on the
weights (a random-weight model gives about ln(vocab) whatever its weights are).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from moe_recipes.cli import main
from moe_recipes.infer.generate import generate, input_device, load_for_inference, pick_device_map
from moe_recipes.infer.perplexity import evaluate_perplexity

PROMPT = "The Debian package management system"
SEQ, SPLIT = 32, "80,20,0"
TINY_MEMORY = {"cpu": 1_000_000}  # bytes: less than the model (17 MB), so accelerate offloads it to disk


@pytest.fixture(scope="module")
def peaked(tiny_mixtral, tmp_path_factory) -> str:
    """The tiny Mixtral folder with its LM head x30: confident logits, so weights show in the loss."""
    from moe_recipes.infer.generate import load_tokenizer

    folder = tmp_path_factory.mktemp("peaked") / "mixtral"
    model = AutoModelForCausalLM.from_pretrained(tiny_mixtral)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    model.save_pretrained(str(folder))
    load_tokenizer(tiny_mixtral).save_pretrained(str(folder))
    return str(folder)


def _tokens(folder: str, **placement) -> list[int]:
    model, tokenizer = load_for_inference(folder, dtype="fp32", **placement)
    return generate(model, tokenizer, PROMPT, max_new_tokens=10).token_ids


def test_generate_with_device_map_auto_gives_the_same_tokens(peaked, tmp_path):
    expected = _tokens(peaked, device="cpu")
    assert _tokens(peaked, device_map="auto") == expected
    offload = {"max_memory": TINY_MEMORY, "offload_folder": str(tmp_path / "offload")}
    model, _ = load_for_inference(peaked, dtype="fp32", device_map="auto", **offload)
    assert "disk" in model.hf_device_map.values()  # really placed by accelerate, weights on disk
    embedding = model.get_input_embeddings().weight
    assert embedding.device.type == "meta" and input_device(model) == torch.device("cpu")
    assert _tokens(peaked, device_map="auto", **offload) == expected


def test_eval_with_device_map_auto_gives_the_same_perplexity(peaked, tiny_mixtral, tiny_dataset, tmp_path):
    kwargs = dict(
        seq_length=SEQ, split=SPLIT, max_samples=4, cache_dir=str(tmp_path / "cache"), progress=False
    )
    kwargs.update(precision="fp32", dtype="fp32")
    expected = evaluate_perplexity(peaked, tiny_dataset, device="cpu", **kwargs)
    spread = evaluate_perplexity(peaked, tiny_dataset, device_map="auto", **kwargs)
    offloaded = evaluate_perplexity(
        peaked,
        tiny_dataset,
        device_map="auto",
        max_memory=TINY_MEMORY,
        offload_folder=str(tmp_path / "offload"),
        **kwargs,
    )
    assert spread.loss == pytest.approx(expected.loss, rel=1e-6)
    assert offloaded.loss == pytest.approx(expected.loss, rel=1e-6)
    assert offloaded.tokens == expected.tokens == 4 * SEQ
    # the check can tell weights apart: the same model with its own head is far from it
    other = evaluate_perplexity(tiny_mixtral, tiny_dataset, device="cpu", **kwargs)
    assert abs(other.loss - expected.loss) > 0.1


def test_cli_device_map_auto(peaked, tiny_dataset, tmp_path, capsys):
    common = ["--prompt", PROMPT, "--max-new-tokens", "6", "--dtype", "fp32"]
    assert main(["generate", peaked, *common, "--device", "cpu"]) == 0
    one_device = capsys.readouterr().out
    assert main(["generate", peaked, *common, "--device-map", "auto"]) == 0
    assert capsys.readouterr().out == one_device
    args = ["eval", peaked, "--data", tiny_dataset, "--seq-length", str(SEQ), "--split", SPLIT]
    args += ["--max-samples", "2", "--cache-dir", str(tmp_path / "cache"), "--precision", "fp32"]
    assert main([*args, "--device-map", "none"]) == 0
    expected = capsys.readouterr().out.strip().splitlines()[-1]
    assert main([*args, "--device-map", "auto"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == expected


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_help_explains_device_map(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "--device-map {none,auto}" in text
    assert "accelerate spread its layers over the visible GPUs, then CPU memory" in text
    assert "the inputs go to the device of its embedding" in text
    assert "Default: auto when a GPU is visible and --device is not given, else none" in text
    assert "--dtype {auto,fp32,bf16}" in text


def test_device_map_choice():
    gpu = torch.cuda.is_available()
    assert pick_device_map(None) == ("auto" if gpu else "none")
    assert pick_device_map(None, "cpu") == "none"  # a named device: the whole model there
    assert pick_device_map("auto") == "auto"
    with pytest.raises(ValueError, match="leave out the device"):
        pick_device_map("auto", "cuda:0")
    with pytest.raises(ValueError, match="not one of none, auto"):
        pick_device_map("balanced")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_device_map_auto_in_bf16(peaked):
    model, tokenizer = load_for_inference(peaked)  # default on a GPU: auto, bf16
    assert model.dtype == torch.bfloat16 and input_device(model).type == "cuda"
    one, _ = load_for_inference(peaked, device="cuda:0")
    assert (
        generate(model, tokenizer, PROMPT, max_new_tokens=8).token_ids
        == generate(one, tokenizer, PROMPT, max_new_tokens=8).token_ids
    )
