"""Bad inputs get clear errors and leave nothing behind; output options (dtype, shards, overwrite)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from moe_recipes.cli import main
from moe_recipes.convert.hf import convert_checkpoint
from moe_recipes.hf_folder import TensorSpec, parse_size, plan_shards

from ..assets import MIXTRAL_TOKENIZER
from ..train.utils import make_config
from .utils import SHORT, logits_of, make_base, probe_ids, weight_map

ITER = "iter_0000002"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_mixtral, tiny_dataset) -> dict[int, Path]:
    """SAVE folders of 2-step runs under ZeRO-0 and ZeRO-3 (one process)."""
    from moe_recipes.train.trainer import train

    out = {}
    for stage in (0, 3):
        d = tmp_path_factory.mktemp(f"zero{stage}")
        assert (
            train(
                make_config(
                    d,
                    tiny_mixtral,
                    tiny_dataset,
                    *SHORT,
                    f"distributed.zero_stage={stage}",
                    f"checkpoint.save={d / 'ckpt'}",
                )
            )
            == 0
        )
        out[stage] = d / "ckpt"
    return out


@pytest.fixture
def zero3_copy(tmp_path, checkpoints) -> Path:
    """A private copy of the ZeRO-3 save folder, to break."""
    return Path(shutil.copytree(checkpoints[3], tmp_path / "ckpt"))


def assert_nothing_written(save: Path) -> None:
    leftovers = [p for p in save.rglob("*") if p.name == "hf" or ".tmp-" in p.name]
    assert not leftovers, leftovers


def test_default_output_then_overwrite(zero3_copy):
    out = convert_checkpoint(zero3_copy)  # the save folder: its `latest` checkpoint
    assert out == zero3_copy / ITER / "hf"
    assert (out / "model.safetensors.index.json").is_file()
    (out / "marker").write_text("old")
    with pytest.raises(ValueError, match=r"already exists.*--overwrite"):
        convert_checkpoint(zero3_copy / ITER)
    assert (out / "marker").is_file()
    assert convert_checkpoint(zero3_copy / ITER, overwrite=True) == out
    assert not (out / "marker").exists() and (out / "config.json").is_file()
    assert not [p for p in out.parent.iterdir() if ".old-" in p.name or ".tmp-" in p.name]


def test_missing_run_state(zero3_copy):
    (zero3_copy / ITER / "run_state.json").unlink()
    with pytest.raises(FileNotFoundError, match="run_state.json"):
        convert_checkpoint(zero3_copy / ITER)
    assert_nothing_written(zero3_copy)


@pytest.mark.parametrize(
    "name",
    [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_0_mp_rank_00_model_states.pt",
        "hf_config/config.json",
    ],
)
def test_missing_files_are_named(zero3_copy, name):
    (zero3_copy / ITER / name).unlink()
    with pytest.raises(FileNotFoundError, match=f"incomplete: missing {name}"):
        convert_checkpoint(zero3_copy / ITER, zero3_copy / "out")
    assert_nothing_written(zero3_copy)


def test_run_state_world_size_needs_every_rank(zero3_copy):
    state_file = zero3_copy / ITER / "run_state.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({**state, "world_size": 2}))
    with pytest.raises(
        FileNotFoundError, match="rng_state_rank1.pt.*zero_pp_rank_1_mp_rank_00_model_states.pt"
    ):
        convert_checkpoint(zero3_copy / ITER, zero3_copy / "out")


def test_unfinished_tmp_folder(zero3_copy):
    tmp = (zero3_copy / ITER).rename(zero3_copy / f"{ITER}.tmp")
    with pytest.raises(ValueError, match="unfinished checkpoint"):
        convert_checkpoint(tmp, zero3_copy / "out")
    assert_nothing_written(zero3_copy)


def test_save_folder_without_latest(tmp_path):
    with pytest.raises(FileNotFoundError, match="no `latest` file"):
        convert_checkpoint(tmp_path, tmp_path / "out")


@pytest.mark.parametrize(
    ("stage", "name"), [(0, "mp_rank_00_model_states.pt"), (3, "zero_pp_rank_0_mp_rank_00_optim_states.pt")]
)
def test_half_written_file(tmp_path, checkpoints, stage, name):
    save = Path(shutil.copytree(checkpoints[stage], tmp_path / "ckpt"))
    path = save / ITER / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="partly written") as err:
        convert_checkpoint(save / ITER)
    assert str(save / ITER) in str(err.value)
    assert_nothing_written(save)


def test_config_of_another_architecture(zero3_copy, tmp_path):
    other = Path(make_base("deepseek_v3", MIXTRAL_TOKENIZER, tmp_path / "deepseek"))
    shutil.copy(other / "config.json", zero3_copy / ITER / "hf_config" / "config.json")
    with pytest.raises(ValueError, match=r"do not fit DeepseekV3ForCausalLM.*missing.*unexpected.*q_proj"):
        convert_checkpoint(zero3_copy / ITER)
    assert_nothing_written(zero3_copy)


def test_config_of_another_size(zero3_copy):
    config_file = zero3_copy / ITER / "hf_config" / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "intermediate_size": 32}))
    with pytest.raises(ValueError, match=r"of another shape \(model.layers.0.mlp.experts"):
        convert_checkpoint(zero3_copy / ITER)
    assert_nothing_written(zero3_copy)


def test_output_may_not_replace_the_checkpoint(zero3_copy):
    with pytest.raises(ValueError, match="would replace the input"):
        convert_checkpoint(zero3_copy / ITER, zero3_copy, overwrite=True)


def test_bf16_in_several_shards(tmp_path, checkpoints, tiny_mixtral):
    ids = probe_ids()
    fp32 = convert_checkpoint(checkpoints[0], tmp_path / "fp32")
    out = convert_checkpoint(checkpoints[0], tmp_path / "bf16", dtype="bf16", max_shard_size="3MB")
    shards = sorted(set(weight_map(out).values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    for shard in shards:
        with safe_open(str(out / shard), "pt") as f:
            tensors = [f.get_tensor(k) for k in f.keys()]
        assert all(t.dtype == torch.bfloat16 for t in tensors)
        size = sum(t.numel() * 2 for t in tensors)
        assert size <= 3_000_000 or len(tensors) == 1  # a tensor larger than the limit gets its own shard
    base, new = (json.loads((p / "config.json").read_text()) for p in (Path(tiny_mixtral), out))
    assert new.pop("dtype") == "bfloat16" and base.pop("dtype") == "float32" and new == base
    reference = logits_of(fp32, ids)
    converted = logits_of(out, ids)
    assert 0 < (converted - reference).abs().max() < 0.05


def test_cli_convert(tmp_path, checkpoints, capsys):
    assert main(["convert", str(checkpoints[0] / ITER), "--output", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "out")
    assert main(["convert", str(checkpoints[0] / ITER), "--output", str(tmp_path / "out")]) == 2
    assert f"output folder {tmp_path / 'out'} already exists" in capsys.readouterr().err


def test_parse_size_and_plan_shards():
    assert parse_size("2GB") == 2 * 10**9 and parse_size("1.5MiB") == 1_572_864 and parse_size(123) == 123
    with pytest.raises(ValueError, match="2 parsecs"):
        parse_size("2 parsecs")
    specs = [TensorSpec(f"t{i}", (n,), torch.float32) for i, n in enumerate([10, 10, 30, 5, 5])]
    plan = plan_shards(specs, max_bytes=80)  # 40, 40, 120, 20, 20 bytes
    assert [[s.name for s in shard] for shard in plan] == [["t0", "t1"], ["t2"], ["t3", "t4"]]


def test_state_dict_file_with_base_model(tmp_path, checkpoints, tiny_mixtral, capsys):
    """A single torch file of `model.`-prefixed keys converts to the same folder as the checkpoint itself."""
    from moe_recipes.convert.hf import convert_state_dict

    module = torch.load(checkpoints[0] / ITER / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    torch.save({k: v.clone() for k, v in module.items()}, tmp_path / "consolidated.pt")
    via_file = convert_state_dict(tmp_path / "consolidated.pt", tiny_mixtral, tmp_path / "from_file")
    direct = convert_checkpoint(checkpoints[0], tmp_path / "direct")
    assert weight_map(via_file) == weight_map(direct)
    for shard in set(weight_map(direct).values()):
        assert (via_file / shard).read_bytes() == (direct / shard).read_bytes()
    assert main(["convert", str(tmp_path / "consolidated.pt"), "--base-model", tiny_mixtral]) == 2
    assert "--output is required" in capsys.readouterr().err
