from pathlib import Path

import pytest
import yaml

from moe_recipes.config import config_from_dict, describe_keys, load_config


def write(tmp_path: Path, tree: dict) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(tree))
    return p


BASE = {"model": {"path": "m"}, "data": {"path": "d"}}


def test_yaml_and_overrides(tmp_path):
    p = write(tmp_path, {**BASE, "train": {"iters": 5, "precision": "fp32"}})
    cfg = load_config(
        p, ["train.iters=7", "optim.lr=1e-4", "data.path=[0.3, a, 0.7, b]", "moe.aux_loss_coef=0"]
    )
    assert cfg.train.iters == 7
    assert cfg.train.precision == "fp32"
    assert cfg.optim.lr == pytest.approx(1e-4)
    assert cfg.data.path == [0.3, "a", 0.7, "b"]
    assert cfg.moe.aux_loss_coef == 0.0 and isinstance(cfg.moe.aux_loss_coef, float)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.iterz=3", "train.iterz"),
        ("trian.iters=3", "trian"),
        ("train.iters=abc", "train.iters"),
        ("train.precision=fp8", "train.precision"),
        ("distributed.zero_stage=4", "distributed.zero_stage"),
        ("optim.min_lr=1.0", "optim.min_lr"),
        ("data.reset_attention_mask=true", "data.reset_attention_mask"),
        ("distributed.offload_params=true", "distributed.offload_params"),
        ("train.iters", "key=value"),
    ],
)
def test_bad_values_name_the_key(tmp_path, override, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        load_config(write(tmp_path, BASE), [override])


def test_unknown_key_in_file(tmp_path):
    with pytest.raises(ValueError, match="model.pth"):
        load_config(write(tmp_path, {**BASE, "model": {"pth": "x"}}))


def test_missing_model_path():
    with pytest.raises(ValueError, match="model.path"):
        load_config(None, ["data.path=x"])


def test_save_roundtrip(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["train.iters=3", "checkpoint.keep_last_n=2"])
    cfg.save(tmp_path / "saved.yaml")
    again = config_from_dict(yaml.safe_load((tmp_path / "saved.yaml").read_text()))
    assert again == cfg


def test_describe_keys_lists_interface_keys():
    text = describe_keys()
    for key in [
        "model.path",
        "data.path",
        "data.split",
        "data.seq_length",
        "data.cache_dir",
        "train.micro_batch_size",
        "train.global_batch_size",
        "train.iters",
        "train.seed",
        "train.precision",
        "train.activation_checkpointing",
        "optim.lr",
        "optim.min_lr",
        "optim.warmup_iters",
        "optim.decay_style",
        "moe.aux_loss_coef",
        "moe.z_loss_coef",
        "eval.interval",
        "eval.iters",
        "log.interval",
        "log.dir",
        "checkpoint.save",
        "checkpoint.save_interval",
        "checkpoint.load",
        "checkpoint.keep_last_n",
        "distributed.engine",
        "distributed.zero_stage",
    ]:
        assert f"\n{key} = " in "\n" + text, key


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")))
def test_shipped_recipes_validate(path):
    cfg = load_config(path)
    assert cfg.train.global_batch_size % cfg.train.micro_batch_size == 0


def test_reduce_dtype_and_loss_kernel(tmp_path):
    p = write(tmp_path, BASE)
    with pytest.raises(ValueError, match="distributed.reduce_dtype=bf16 needs train.precision=bf16"):
        load_config(p, ["train.precision=fp32", "distributed.reduce_dtype=bf16"])
    with pytest.raises(ValueError, match="distributed.reduce_dtype='fp16' is not one of fp32, bf16"):
        load_config(p, ["distributed.reduce_dtype=fp16"])
    with pytest.raises(ValueError, match="train.loss_kernel='triton' is not one of auto, compiled, eager"):
        load_config(p, ["train.loss_kernel=triton"])
    from moe_recipes.engines.deepspeed_zero import deepspeed_config

    for reduce in ("fp32", "bf16"):
        cfg = load_config(p, ["train.precision=bf16", f"distributed.reduce_dtype={reduce}"])
        assert deepspeed_config(cfg, 1)["communication_data_type"] == reduce
