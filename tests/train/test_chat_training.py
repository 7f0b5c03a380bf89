"""Instruction tuning end to end: `train(cfg)` on chat data, and `moe-recipes inspect` / `index`."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from moe_recipes.cli import main
from moe_recipes.data.factory import build_training_data
from moe_recipes.train.trainer import train
from tests.train.utils import make_config, step_records, write_config

DEMO_CHAT = Path(__file__).resolve().parents[2] / "demo" / "chat"


def _chat_files(tmp_path: Path) -> str:
    """The bundled chat sample copied out of the repository (its .index_cache/ goes there)."""
    folder = tmp_path / "chat"
    shutil.copytree(DEMO_CHAT, folder)
    return f"[{folder / 'howto.jsonl'}, {folder / 'arithmetic.jsonl'}]"


CHAT = (
    "data.format=chat",
    "data.packing=true",
    "data.seq_length=128",
    "data.split=85,15,0",
    "train.epochs=1",
)


def test_assistant_loss_falls_during_tuning(tmp_path, tiny_mixtral):
    data = _chat_files(tmp_path)
    extra = (*CHAT, "optim.lr=3e-3", "optim.min_lr=3e-4", "moe.z_loss_coef=0", "eval.interval=2")
    expected = make_config(tmp_path, tiny_mixtral, data, *extra)
    per_epoch = build_training_data(expected).train.table.epoch_ends[0]
    cfg = make_config(tmp_path, tiny_mixtral, data, *extra)
    assert train(cfg) == 0
    assert cfg.train.iters == expected.train.iters
    steps = step_records(tmp_path / "run")
    assert sorted(steps) == list(range(1, cfg.train.iters + 1)) and 3 <= cfg.train.iters <= 6
    assert per_epoch >= cfg.train.iters * 4 - 3  # one epoch, rounded up to whole global batches
    losses = [steps[s]["lm_loss"] for s in sorted(steps)]
    assert losses[-1] < losses[0] - 0.5
    valid = [
        r["valid_loss"]
        for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").open())
        if "valid_loss" in r
    ]
    assert len(valid) >= 2 and valid[-1] < valid[0]


def test_inspect_chat_and_pretrain_configs(tmp_path, tiny_mixtral, tiny_dataset, capsys):
    chat_cfg = write_config(tmp_path, tiny_mixtral, _chat_files(tmp_path), *CHAT)
    assert main(["inspect", str(chat_cfg), "--index", "1", "--count", "2", "--json"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]  # stdout holds JSON only
    assert [r["index"] for r in lines] == [1, 2]
    for r in lines:
        ids, labels, pos = r["input_ids"], r["labels"], r["position_ids"]
        assert len(ids) == len(labels) == len(pos) <= 128
        assert pos.count(0) > 1  # several conversations packed, positions restart
        trained = [t for t, lab in enumerate(labels) if lab != -100]
        inside = [t for t in trained if t + 1 < len(ids) and pos[t + 1] != 0]
        assert trained and all(labels[t] == ids[t + 1] for t in inside)
        # a conversation's last target is its end of turn, never the next conversation's first token
        assert all(labels[t] == 2 for t in trained if t + 1 == len(ids) or pos[t + 1] == 0)
    assert main(["inspect", str(chat_cfg)]) == 0
    text = capsys.readouterr().out
    spans = re.findall(r"\[\[(.*?)\]\]", text, flags=re.S)
    assert spans and all(s.endswith("</s>") for s in spans)
    assert "[INST]" in text and not any("[INST]" in s for s in spans)

    pre_cfg = write_config(tmp_path, tiny_mixtral, tiny_dataset)
    assert main(["inspect", str(pre_cfg), "--json"]) == 0
    (record,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(record["input_ids"]) == 64 and record["labels"][:-1] == record["input_ids"][1:]


def test_index_command(tmp_path, capsys):
    path = tmp_path / "c.jsonl"
    path.write_text((DEMO_CHAT / "howto.jsonl").read_text() + "oops\n")
    assert main(["index", str(path)]) == 2
    assert f"{path}:17: not valid JSON" in capsys.readouterr().err
    assert main(["index", str(path), "--skip-bad-lines"]) == 0
    assert "16 conversations, index written" in capsys.readouterr().out
    assert (tmp_path / ".index_cache" / "c.jsonl.index.npy").is_file()


def _as_parquet(jsonl: Path, row_group_size: int) -> Path:
    """The same records as Parquet rows (messages, or input + output), beside an unrelated column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    table = pa.Table.from_pylist(records).append_column("source", pa.array(["demo"] * len(records)))
    path = jsonl.with_suffix(".parquet")
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def test_parquet_chat_gives_the_samples_of_its_jsonl_twin(tmp_path, tiny_mixtral, capsys):
    """Both chat formats as Parquet with small row groups, packed: `inspect --json` is the JSONL's."""
    folder = tmp_path / "chat"
    shutil.copytree(DEMO_CHAT, folder)
    twins = [_as_parquet(folder / name, row_group_size=5) for name in ("howto.jsonl", "arithmetic.jsonl")]
    outputs = []
    for files in ([folder / "howto.jsonl", folder / "arithmetic.jsonl"], twins):
        run = tmp_path / files[0].suffix.strip(".")
        run.mkdir()
        cfg = write_config(run, tiny_mixtral, f"[{files[0]}, {files[1]}]", *CHAT)
        assert main(["inspect", str(cfg), "--count", "30", "--json"]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and len(outputs[0].splitlines()) > 5
    index = folder / ".index_cache" / "arithmetic.parquet.index.npy"
    assert index.is_file()  # row group + row offsets, so a later open reads no row


def test_bad_parquet_chat_row_names_file_and_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from moe_recipes.data.chat import ChatFile

    good = {"role": "assistant", "content": "fine"}
    rows = [{"input": [{"role": "user", "content": f"q{i}"}], "output": good} for i in range(12)]
    rows[8]["output"] = {"role": "assistant", "content": None}
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=5)
    try:
        ChatFile(path)
    except ValueError as err:
        assert f"{path}, row 9: output: content of the assistant message must be a string" in str(err)
    else:
        raise AssertionError("no error for a null content")
    chats = ChatFile(path, skip_bad_lines=True)
    assert (len(chats), chats.info.bad_lines, chats.line_number(8)) == (11, 1, 10)
    assert chats[8] == [{"role": "user", "content": "q9"}, good]
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "other.parquet")
    try:
        ChatFile(tmp_path / "other.parquet")
    except ValueError as err:
        assert "expected a 'messages' column or 'input' and 'output' columns, got text" in str(err)
    else:
        raise AssertionError("no error for a file without conversation columns")
