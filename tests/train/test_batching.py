import numpy as np
import torch

from moe_recipes.data.batching import PretrainCollator, reset_positions


def test_reset_positions():
    pos = reset_positions(np.array([0, 3, 4]), 7)
    assert pos.tolist() == [0, 1, 2, 0, 0, 1, 2]
    assert reset_positions(np.array([0]), 4).tolist() == [0, 1, 2, 3]


def test_collator_shifts_labels_and_masks():
    samples = [
        {"tokens": np.arange(6), "doc_starts": np.array([0, 2])},
        {"tokens": np.arange(10, 16), "doc_starts": np.array([0])},
    ]
    plain = PretrainCollator()(samples)
    assert plain["input_ids"].tolist() == [[0, 1, 2, 3, 4], [10, 11, 12, 13, 14]]
    assert plain["labels"].tolist() == [[1, 2, 3, 4, 5], [11, 12, 13, 14, 15]]
    assert set(plain) == {"input_ids", "labels"}
    pos_only = PretrainCollator(reset_position_ids=True)(samples)
    assert pos_only["position_ids"].tolist() == [[0, 1, 0, 1, 2], [0, 1, 2, 3, 4]]
    assert torch.equal(pos_only["attention_mask"], torch.ones(2, 5, dtype=torch.long))
    packed = PretrainCollator(reset_position_ids=True, reset_attention_mask=True)(samples)
    assert "attention_mask" not in packed and packed["position_ids"].shape == (2, 5)
