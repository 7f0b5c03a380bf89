"""Generation: greedy equals transformers' greedy generate, streaming, chat template, BOS, sampling seeds."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moe_recipes.cli import main
from moe_recipes.infer.generate import generate, generate_text, load_for_inference, prompt_ids

from ..assets import DEEPSEEK_TOKENIZER, MIXTRAL_TOKENIZER

PROMPT = "The Debian package management system"


@pytest.fixture(scope="module")
def loaded(tiny_mixtral):
    return load_for_inference(tiny_mixtral, device="cpu")


def test_greedy_equals_model_generate(tiny_mixtral, loaded, capsys):
    model, tokenizer = loaded
    result = generate(model, tokenizer, PROMPT, max_new_tokens=12, temperature=0.0, stream=True)
    streamed = capsys.readouterr().out

    reference_model = AutoModelForCausalLM.from_pretrained(tiny_mixtral)
    ids = torch.tensor([tokenizer(PROMPT)["input_ids"]])  # the Mixtral tokenizer adds BOS itself
    with torch.no_grad():
        out = reference_model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=12,
            pad_token_id=tokenizer.eos_token_id,
        )
    assert result.prompt_ids == ids[0].tolist()
    assert result.token_ids == out[0, ids.shape[1] :].tolist()
    assert len(result.token_ids) > 0
    assert result.text == tokenizer.decode(result.token_ids, skip_special_tokens=True)
    assert streamed.strip() == result.text.strip()  # what was printed as it came is the returned text


def test_generate_text_loads_the_folder(tiny_mixtral, loaded, capsys):
    model, tokenizer = loaded
    expected = generate(model, tokenizer, PROMPT, max_new_tokens=6).text
    assert generate_text(tiny_mixtral, PROMPT, max_new_tokens=6, stream=False) == expected
    assert capsys.readouterr().out == ""  # no streaming asked for


def test_chat_applies_the_template(loaded):
    model, tokenizer = loaded
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi there"}], tokenize=False, add_generation_prompt=True
    )
    assert "[INST] Hi there [/INST]" in text  # the Mixtral template
    expected = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert prompt_ids(tokenizer, "Hi there", chat=True) == expected
    assert expected.count(tokenizer.bos_token_id) == 1
    result = generate(model, tokenizer, "Hi there", chat=True, max_new_tokens=3)
    assert result.prompt_ids == expected


def test_plain_prompt_starts_with_bos_once():
    mixtral = AutoTokenizer.from_pretrained(str(MIXTRAL_TOKENIZER))  # adds BOS itself
    deepseek = AutoTokenizer.from_pretrained(str(DEEPSEEK_TOKENIZER))  # does not
    for tok in (mixtral, deepseek):
        ids = prompt_ids(tok, PROMPT)
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
        assert tok.decode(ids[1:]).strip() == PROMPT


def test_chat_without_template_is_an_error(loaded):
    _, tokenizer = loaded
    saved, tokenizer.chat_template = tokenizer.chat_template, None
    try:
        with pytest.raises(ValueError, match="no chat template"):
            prompt_ids(tokenizer, "hi", chat=True)
    finally:
        tokenizer.chat_template = saved


def test_sampling_is_reproducible_with_a_seed(loaded):
    model, tokenizer = loaded
    runs = [
        generate(model, tokenizer, PROMPT, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=s).token_ids
        for s in (3, 3, 4)
    ]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"temperature": -1.0}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"max_new_tokens": 0}, "max_new")],
)
def test_bad_sampling_arguments(loaded, kwargs, message):
    model, tokenizer = loaded
    with pytest.raises(ValueError, match=message):
        generate(model, tokenizer, PROMPT, **kwargs)


def test_cli_generate(tiny_mixtral, loaded, capsys):
    model, tokenizer = loaded
    expected = generate(model, tokenizer, PROMPT, max_new_tokens=5).text
    assert main(["generate", tiny_mixtral, "--prompt", PROMPT, "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip() == expected.strip()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_greedy_in_bf16(tiny_mixtral):
    model, tokenizer = load_for_inference(tiny_mixtral)  # auto: the GPU, in bf16
    assert model.device.type == "cuda" and model.dtype == torch.bfloat16
    result = generate(model, tokenizer, PROMPT, max_new_tokens=8)
    ids = torch.tensor([result.prompt_ids], device="cuda")
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=8,
            pad_token_id=tokenizer.eos_token_id,
        )
    assert result.token_ids == out[0, ids.shape[1] :].tolist()
