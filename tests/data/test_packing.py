"""Packing: bins, sample order over epochs and weights, the collator, and packed == padded loss."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM

from moe_recipes.config import load_config
from moe_recipes.data.chat import IGNORE_INDEX, chat_sample, tokenize_chat
from moe_recipes.data.factory import build_training_data
from moe_recipes.data.packing import ChatCollator, epoch_order, pack_lengths, parse_chat_paths, train_table

from ..assets import MIXTRAL_TOKENIZER as MIXTRAL

REPO = Path(__file__).resolve().parents[2]
DEMO_CHAT = REPO / "demo" / "chat"


def test_pack_lengths_places_every_item_once_within_capacity():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 60, size=300)
    bins = pack_lengths(lengths, 64)
    assert sorted(i for b in bins for i in b) == list(range(300))
    assert all(sum(lengths[b]) <= 64 for b in bins)
    assert all(b == sorted(b) for b in bins)  # order kept inside a bin
    assert len(bins) < 0.6 * 300 and sum(lengths) / (64 * len(bins)) > 0.85
    with pytest.raises(ValueError, match="item 1 has 65 tokens"):
        pack_lengths([3, 65], 64)


def test_epoch_order_takes_each_conversation_once_or_by_weight():
    pools = [np.arange(0, 10), np.arange(10, 40)]
    once = epoch_order(pools, None, epoch=0, seed=1)
    assert sorted(once.tolist()) == list(range(40))
    assert epoch_order(pools, None, epoch=1, seed=1).tolist() != once.tolist()
    weighted = np.concatenate([epoch_order(pools, [0.5, 0.5], epoch=e, seed=1) for e in range(3)])
    small = weighted < 10
    assert small.sum() == 60  # half of 3 x 40: the small pool cycles through 6 passes
    assert np.bincount(weighted[small], minlength=10).tolist() == [6] * 10


def test_train_table_epochs_and_samples():
    pools = [np.arange(20)]
    table, samples = train_table(pools, None, None, 64, seed=0, epochs=2.5)
    assert samples == 50 and len(table) == 60
    lengths = np.full(20, 16)
    packed, n = train_table(pools, None, lengths, 64, seed=0, samples=7)
    assert n == 7 and len(packed) == 10 and packed.epoch_ends == [5, 10]  # 4 conversations per sequence


def test_parse_chat_paths():
    assert parse_chat_paths("a.jsonl") == (["a.jsonl"], None)
    assert parse_chat_paths(["a.jsonl", "b.jsonl"]) == (["a.jsonl", "b.jsonl"], None)
    assert parse_chat_paths([3, "a.jsonl", "1", "b.jsonl"]) == (["a.jsonl", "b.jsonl"], [0.75, 0.25])
    with pytest.raises(ValueError, match="blend weights"):
        parse_chat_paths([-1, "a.jsonl", 1, "b.jsonl"])


def test_collator_pads_with_pad_id_and_resets_positions():
    a = {
        "input_ids": np.array([5, 6, 7, 8]),
        "labels": np.array([-100, 7, 8, 9]),
        "position_ids": np.array([0, 1, 0, 1]),
    }
    b = {"input_ids": np.array([5, 6]), "labels": np.array([6, -100]), "position_ids": np.array([0, 1])}
    packed = ChatCollator(pad_id=2, packed=True)([a, b])
    assert set(packed) == {"input_ids", "labels", "position_ids", "real_tokens"}
    assert packed["real_tokens"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]  # the padded tail, for router stats
    assert packed["input_ids"][1].tolist() == [5, 6, 2, 2]
    assert packed["labels"][1].tolist() == [6, -100, -100, -100]
    assert packed["position_ids"].tolist() == [[0, 1, 0, 1], [0, 1, 0, 1]]
    padded = ChatCollator(pad_id=2, packed=False)([a, b])
    assert set(padded) == {"input_ids", "labels", "attention_mask"}
    assert padded["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]


def _loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
    labels = batch.pop("labels")
    batch.pop("real_tokens", None)  # the objective's, not the model's
    logits = model(
        **batch, use_cache=False
    ).logits.float()  # packed detection needs no cache (as in training)
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss.item(), int((labels != IGNORE_INDEX).sum())


def test_packed_loss_equals_padded_loss():
    tok = AutoTokenizer.from_pretrained(MIXTRAL)
    lines = (DEMO_CHAT / "howto.jsonl").read_text().splitlines()[:6]
    samples = [chat_sample(tokenize_chat(tok, json.loads(x)["messages"], 1000)) for x in lines]
    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=512,
    )
    model = MixtralForCausalLM(config).eval()
    with torch.no_grad():
        padded = _loss(model, ChatCollator(tok.eos_token_id, packed=False)(samples))
        bins = [samples[:3], samples[3:]]
        rows = [{k: np.concatenate([s[k] for s in b]) for k in b[0]} for b in bins]
        packed = _loss(model, ChatCollator(tok.eos_token_id, packed=True)(rows))
        # control: the same rows with positions that do not restart attend across conversations
        for r in rows:
            r["position_ids"] = np.arange(len(r["input_ids"]))
        leaky = _loss(model, ChatCollator(tok.eos_token_id, packed=True)(rows))
    assert padded[1] == packed[1] > 100
    reference = padded[0] / padded[1]
    assert packed[0] / packed[1] == pytest.approx(reference, rel=1e-6)
    assert abs(leaky[0] / leaky[1] - reference) > 1e-5 * reference  # 100x the tolerance above


def test_build_chat_data_with_epochs_and_a_held_out_part(tmp_path):
    for f in DEMO_CHAT.glob("*.jsonl"):
        (tmp_path / f.name).write_text(f.read_text())
    cfg = load_config(
        None,
        [
            f"model.path={MIXTRAL}",
            "data.format=chat",
            f"data.path=[{tmp_path}/howto.jsonl, {tmp_path}/arithmetic.jsonl]",
            "data.seq_length=128",
            "data.packing=true",
            "data.split=80,20,0",
            "train.epochs=2",
            "train.global_batch_size=4",
            "train.micro_batch_size=4",
        ],
    )
    data = build_training_data(cfg)
    per_epoch = data.train.table.epoch_ends[0]
    assert cfg.train.iters == -(-2 * per_epoch // 4)
    assert len(data.train) >= cfg.train.iters * 4
    train_ids = set(data.train.table.conv_ids.tolist())
    valid_ids = set(data.valid.table.conv_ids.tolist())
    assert not train_ids & valid_ids and len(train_ids) + len(valid_ids) == 64
    assert len(valid_ids) == round(0.2 * 48) + round(0.2 * 16)
    sample = data.train[0]
    assert len(sample["input_ids"]) <= 128 and (np.asarray(sample["position_ids"]) == 0).sum() > 1
    assert data.valid[len(data.valid)]["input_ids"].tolist() == data.valid[0]["input_ids"].tolist()  # wraps
