"""Fail fast: every cheap check runs before the rendezvous, the model load or an op build."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moe_recipes.cli import main
from moe_recipes.config import load_config
from moe_recipes.data.indexed import write_index
from moe_recipes.train.preflight import ineffective_settings, preflight
from moe_recipes.train.trainer import train

from .utils import make_config, overrides, write_config


def _dataset(prefix: Path, tokens: np.ndarray) -> str:
    tokens.astype(np.uint16).tofile(f"{prefix}.bin")
    write_index(f"{prefix}.idx", np.uint16, np.array([len(tokens)]))
    return str(prefix)


def test_missing_data_prefix_fails_before_the_model_loads(tmp_path, tiny_mixtral, nothing_expensive):
    cfg = make_config(tmp_path, tiny_mixtral, str(tmp_path / "no_such_text_document"))
    with pytest.raises(FileNotFoundError, match="no_such_text_document"):
        train(cfg)


def test_token_ids_beyond_the_vocabulary_fail_naming_file_and_id(tmp_path, tiny_mixtral, nothing_expensive):
    tokens = np.arange(2000) % 1000
    tokens[1234] = 40000  # the tiny Mixtral has the real 32000-token vocabulary
    prefix = _dataset(tmp_path / "wrong_tok", tokens)
    cfg = make_config(tmp_path, tiny_mixtral, prefix)
    with pytest.raises(ValueError, match=r"wrong_tok\.bin holds token id 40000.*32000"):
        train(cfg)


def test_large_dataset_is_sampled_but_a_wrong_tokenizer_is_still_found(tmp_path, tiny_mixtral, monkeypatch):
    from moe_recipes.train import preflight as preflight_mod

    tokens = np.full(100_000, 7)
    tokens[::500] = 50000  # a foreign tokenizer's ids are everywhere, not in one corner
    prefix = _dataset(tmp_path / "big", tokens)
    monkeypatch.setattr(preflight_mod, "SAMPLE_TOKENS", 4096)  # much less than the dataset
    with pytest.raises(ValueError, match="holds token id 50000"):
        preflight(make_config(tmp_path, tiny_mixtral, prefix))


def test_model_folder_without_config_fails(tmp_path, tiny_dataset, nothing_expensive):
    (tmp_path / "empty_model").mkdir()
    cfg = make_config(tmp_path, str(tmp_path / "empty_model"), tiny_dataset)
    with pytest.raises(FileNotFoundError, match=r"model\.path: .*empty_model has no config\.json"):
        train(cfg)


def test_mistyped_checkpoint_load_is_an_error(tmp_path, tiny_mixtral, tiny_dataset, nothing_expensive):
    cfg = make_config(tmp_path, tiny_mixtral, tiny_dataset, f"checkpoint.load={tmp_path / 'ckpts_typo'}")
    with pytest.raises(FileNotFoundError, match="checkpoint.load: .*ckpts_typo does not exist"):
        train(cfg)
    (tmp_path / "empty").mkdir()
    cfg = make_config(tmp_path, tiny_mixtral, tiny_dataset, f"checkpoint.load={tmp_path / 'empty'}")
    with pytest.raises(FileNotFoundError, match="holds no complete checkpoint"):
        train(cfg)


def test_resume_with_nothing_saved_yet_starts_fresh_and_says_so(tmp_path, tiny_mixtral, tiny_dataset):
    save = tmp_path / "ckpt"
    cfg = make_config(
        tmp_path, tiny_mixtral, tiny_dataset, f"checkpoint.save={save}", f"checkpoint.load={save}"
    )
    checks = preflight(cfg)
    assert checks.resume_from is None
    assert checks.notes == [f"no checkpoint in {save} yet: starting fresh from {tiny_mixtral}"]


def _fake_checkpoint(save: Path, **state) -> Path:
    ckpt = save / "iter_0000002"
    ckpt.mkdir(parents=True)
    (ckpt / "run_state.json").write_text(json.dumps({"iteration": 2, "consumed_samples": 8, **state}))
    (save / "latest").write_text("iter_0000002\n")
    return ckpt


@pytest.mark.parametrize(
    ("saved", "key", "message"),
    [
        ({"seq_length": 128}, "seq_length", "data.seq_length=128, the config says 64"),
        ({"global_batch_size": 16}, "global_batch_size", "train.global_batch_size=16, the config says 4"),
        ({"base_model": "/elsewhere/model"}, "base_model", "model.path='/elsewhere/model'"),
    ],
)
def test_resume_mismatch_names_both_values_and_the_override(
    tmp_path, tiny_mixtral, tiny_dataset, saved, key, message
):
    save = tmp_path / "ckpt"
    state = {"seq_length": 64, "global_batch_size": 4, "base_model": tiny_mixtral, "engine": "deepspeed"}
    _fake_checkpoint(save, **{**state, **saved})
    extra = [f"checkpoint.save={save}", f"checkpoint.load={save}"]
    with pytest.raises(ValueError, match=rf"{message}.*checkpoint\.allow_changes=\[{key}\]"):
        preflight(make_config(tmp_path, tiny_mixtral, tiny_dataset, *extra))
    checks = preflight(
        make_config(tmp_path, tiny_mixtral, tiny_dataset, *extra, f"checkpoint.allow_changes=[{key}]")
    )
    assert checks.resume_from == save / "iter_0000002"


def test_resume_with_the_other_engine_is_an_error(tmp_path, tiny_mixtral, tiny_dataset):
    save = tmp_path / "ckpt"
    _fake_checkpoint(save, engine="fsdp2", seq_length=64, global_batch_size=4, base_model=tiny_mixtral)
    cfg = make_config(tmp_path, tiny_mixtral, tiny_dataset, f"checkpoint.load={save}")
    with pytest.raises(ValueError, match="written by distributed.engine=fsdp2, the config says deepspeed"):
        preflight(cfg)


def test_real_resume_with_another_seq_length_stops_at_once(tmp_path, tiny_mixtral, tiny_dataset, capsys):
    save = tmp_path / "ckpt"
    config = write_config(
        tmp_path, tiny_mixtral, tiny_dataset, "train.iters=2", "eval.iters=0", f"checkpoint.save={save}"
    )
    assert main(["train", str(config)]) == 0
    assert main(["train", str(config), "--resume", "train.iters=4", "data.seq_length=32"]) == 2
    err = capsys.readouterr().err
    assert "trained with data.seq_length=64, the config says 32" in err


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("log.interval=0", "log.interval must be > 0"),
        ("eval.interval=-1", "eval.interval must be >= 0"),
        ("eval.iters=-2", "eval.iters must be >= 0"),
        ("optim.decay_iters=0", "optim.decay_iters must be >= 1"),
        ("optim.decay_iters=1", "optim.decay_iters=1 is shorter than optim.warmup_iters=2"),
        ("checkpoint.allow_changes=[vocab]", "checkpoint.allow_changes"),
    ],
)
def test_out_of_range_keys_fail_at_validation(tmp_path, override, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        load_config(None, overrides(tmp_path, "m", "d", override))


def test_settings_without_effect_are_named(tmp_path):
    def notes(*extra):
        return ineffective_settings(load_config(None, overrides(tmp_path, "m", "d", *extra)))

    assert notes() == []  # ZeRO-0 (the test default), default kernel
    assert notes("distributed.engine=fsdp2", "distributed.zero_stage=2") == []  # the default stage
    (kernel,) = notes("distributed.zero_stage=3", "train.loss_kernel=compiled")
    assert kernel.startswith("train.loss_kernel=compiled has no effect under ZeRO-3")
    both = notes("distributed.engine=fsdp2", "distributed.zero_stage=3", "train.loss_kernel=eager")
    assert [n.split(" ")[0] for n in both] == ["train.loss_kernel=eager", "distributed.zero_stage=3"]
    chat = notes("data.format=chat", "data.reset_position_ids=true")
    assert chat and chat[0].startswith("data.reset_position_ids applies to pre-training data only")


def test_warnings_are_printed_once_at_start(tmp_path, tiny_mixtral, tiny_dataset, capsys):
    cfg = make_config(
        tmp_path,
        tiny_mixtral,
        tiny_dataset,
        "train.iters=1",
        "eval.iters=0",
        "distributed.zero_stage=3",
        "train.loss_kernel=eager",
    )
    assert train(cfg) == 0
    err = capsys.readouterr().err
    assert err.count("warning: train.loss_kernel=eager has no effect under ZeRO-3") == 1


BLOCK_DEEPSPEED = (
    "import sys; sys.modules['deepspeed'] = None; "  # `import deepspeed` now fails as if not installed
    "from moe_recipes.cli import main; sys.exit(main(sys.argv[1:]))"
)


def test_fsdp2_trains_without_deepspeed_installed(tmp_path, tiny_mixtral, tiny_dataset):
    config = write_config(
        tmp_path, tiny_mixtral, tiny_dataset, "train.iters=2", "eval.iters=0", "distributed.engine=fsdp2"
    )
    from concurrent.futures import ThreadPoolExecutor

    def train(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", BLOCK_DEEPSPEED, "train", str(config), *extra],
            capture_output=True,
            text=True,
            timeout=300,
        )

    with ThreadPoolExecutor(2) as pool:  # two independent processes: at once
        run, refused = pool.map(lambda extra: train(*extra), [(), ("distributed.engine=deepspeed",)])
    assert run.returncode == 0, run.stderr[-3000:]
    assert "FSDP2" in run.stdout and "step 2/2" in run.stdout
    assert refused.returncode == 2
    assert "distributed.engine=deepspeed needs DeepSpeed, which is not installed" in refused.stderr
