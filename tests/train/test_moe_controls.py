"""MoE controls inside real training runs: balancing variants, routing-bias updates, freezing."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from moe_recipes.convert.hf import convert_checkpoint
from moe_recipes.models.init import init_model
from moe_recipes.train import trainer
from moe_recipes.train.trainer import train

from ..assets import MIXTRAL_TOKENIZER
from .utils import make_config, step_records


def test_global_and_sequence_losses_do_not_depend_on_accumulation(tmp_path, tiny_mixtral, tiny_dataset):
    """Micro batch 4 x 1 step == micro batch 2 x 2 accumulation steps, balancing losses included."""
    runs = {}
    for mbs in (4, 2):
        d = tmp_path / f"mbs{mbs}"
        cfg = make_config(
            d,
            tiny_mixtral,
            tiny_dataset,
            f"train.micro_batch_size={mbs}",
            "train.iters=3",
            "moe.aux_loss_coef=0",
            "moe.z_loss_coef=0",
            "moe.global_aux_loss_coef=0.5",
            "moe.seq_aux_loss_coef=0.5",
            "eval.iters=0",
        )
        assert train(cfg) == 0
        runs[mbs] = list(step_records(d / "run").values())
    for big, small in zip(runs[4], runs[2], strict=True):
        for key in ("lm_loss", "global_aux_loss", "seq_aux_loss", "loss"):
            assert big[key] == pytest.approx(small[key], rel=1e-5), key
        assert big["loss"] == pytest.approx(
            big["lm_loss"] + 0.5 * big["global_aux_loss"] + 0.5 * big["seq_aux_loss"], rel=1e-6
        )
        # a plausible value: the default (hf) form gives top_k = 2 for even routing, more when skewed
        assert big["global_aux_loss"] >= 1.0 - 1e-6
    # the global-batch loss trained the router: the step-3 value differs from step 1
    assert runs[4][0]["global_aux_loss"] != pytest.approx(runs[4][-1]["global_aux_loss"], rel=1e-6)


@pytest.fixture(scope="module")
def tiny_deepseek_v3(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("models") / "deepseek_v3"
    return init_model(
        arch="deepseek_v3",
        tokenizer_dir=str(MIXTRAL_TOKENIZER),
        output_dir=str(out),
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_experts=4,
        top_k=2,
        expert_intermediate_size=32,
        max_position_embeddings=512,
        seed=0,
    )


def _bias(hf_dir) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir))
    biases = [b for name, b in model.named_buffers() if name.endswith("e_score_correction_bias")]
    assert biases, "no e_score_correction_bias in the exported model"
    return torch.stack(biases)


def test_routing_bias_is_updated_saved_resumed_and_exported(tmp_path, tiny_deepseek_v3, tiny_dataset):
    rate = 0.01
    common = ("moe.aux_loss_coef=0", f"moe.bias_update_rate={rate}", "eval.iters=0", "train.iters=4")
    full = make_config(
        tmp_path / "full", tiny_deepseek_v3, tiny_dataset, *common, f"checkpoint.save={tmp_path / 'a'}"
    )
    assert train(full) == 0
    ckpt = tmp_path / "b"
    first = make_config(
        tmp_path / "split",
        tiny_deepseek_v3,
        tiny_dataset,
        *common,
        f"checkpoint.save={ckpt}",
        "train.exit_interval=1",
    )
    assert train(first) == 0
    after_one = _bias(convert_checkpoint(ckpt, output_dir=tmp_path / "hf1"))
    second = make_config(
        tmp_path / "split",
        tiny_deepseek_v3,
        tiny_dataset,
        *common,
        f"checkpoint.save={ckpt}",
        f"checkpoint.load={ckpt}",
    )
    assert train(second) == 0
    full_bias = _bias(convert_checkpoint(tmp_path / "a", output_dir=tmp_path / "hf_full"))
    resumed_bias = _bias(convert_checkpoint(ckpt, output_dir=tmp_path / "hf_resumed"))
    # one step moves each entry by exactly -rate, 0 or +rate (sign of mean load - load), and not all by 0
    assert set((after_one / rate).round().flatten().tolist()) <= {-1.0, 0.0, 1.0}
    torch.testing.assert_close(after_one, (after_one / rate).round() * rate)
    assert after_one.abs().sum() > 0
    steps_4 = full_bias / rate
    assert torch.allclose(steps_4, steps_4.round(), atol=1e-4) and steps_4.abs().max() <= 4 + 1e-4
    # the resumed run restored the step-1 bias (starting from zeros would route, and end, elsewhere)
    torch.testing.assert_close(resumed_bias, full_bias, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("checkpoint_coef", "used"), [(0.0, 0.0), (0.02, 0.02)])
def test_aux_loss_coef_defaults_to_the_checkpoints_and_keeps_its_zero(
    tmp_path, tiny_mixtral, tiny_dataset, checkpoint_coef, used
):
    """moe.aux_loss_coef unset: the model's router_aux_loss_coef, 0 included (no balancing loss, as the
    checkpoint was trained), not 0.01."""
    model = AutoModelForCausalLM.from_pretrained(tiny_mixtral)
    model.config.router_aux_loss_coef = checkpoint_coef
    model.save_pretrained(tmp_path / "model")
    cfg = make_config(
        tmp_path, str(tmp_path / "model"), tiny_dataset, "moe.aux_loss_coef=null", "eval.iters=0"
    )
    run = trainer.setup(cfg)
    try:
        assert run.engine.module.coefs.micro_batch == used
        assert run.engine.module.coefs.aux_loss_type == "hf"
    finally:
        run.writer.close()


def test_bias_update_needs_a_router_with_bias(tmp_path, tiny_mixtral, tiny_dataset):
    cfg = make_config(tmp_path, tiny_mixtral, tiny_dataset, "moe.bias_update_rate=0.001")
    with pytest.raises(ValueError, match="e_score_correction_bias"):
        train(cfg)


def test_frozen_parameters_do_not_change_and_the_count_is_printed(
    tmp_path, tiny_mixtral, tiny_dataset, capsys
):
    cfg = make_config(
        tmp_path,
        tiny_mixtral,
        tiny_dataset,
        "train.iters=2",
        "eval.iters=0",
        "moe.freeze=[router, attention, embeddings]",
        "moe.freeze_patterns=['layers\\.1\\.mlp\\.experts']",
        f"checkpoint.save={tmp_path / 'ckpt'}",
    )
    assert train(cfg) == 0
    out = capsys.readouterr().out
    base = AutoModelForCausalLM.from_pretrained(tiny_mixtral)
    total = sum(p.numel() for p in base.parameters())
    frozen = sum(
        p.numel()
        for n, p in base.named_parameters()
        if ".mlp.gate." in n or "self_attn" in n or "embed_tokens" in n or "layers.1.mlp.experts" in n
    )
    assert f"trainable parameters {total - frozen:,} of {total:,}" in out
    hf = convert_checkpoint(tmp_path / "ckpt", output_dir=tmp_path / "hf")
    trained = AutoModelForCausalLM.from_pretrained(str(hf)).state_dict()
    before = base.state_dict()
    assert trained.keys() == before.keys()
    for name, value in trained.items():
        unchanged = torch.equal(value, before[name])
        is_frozen = any(
            k in name for k in (".mlp.gate.", "self_attn", "embed_tokens", "layers.1.mlp.experts")
        )
        assert unchanged == is_frozen, name
