import math

import pytest

from moe_recipes.config import OptimConfig
from moe_recipes.train.schedule import lr_at


def cfg(**kw):
    base = {"lr": 1.0, "min_lr": 0.1, "warmup_iters": 10}
    base.update(kw)
    return OptimConfig(**base)


def test_warmup_is_linear_to_peak():
    c = cfg(decay_style="cosine")
    assert lr_at(0, c, 110) == pytest.approx(0.1)
    assert lr_at(4, c, 110) == pytest.approx(0.5)
    assert lr_at(9, c, 110) == pytest.approx(1.0)


def test_cosine_midpoint_and_end():
    c = cfg(decay_style="cosine")
    assert lr_at(10, c, 110) == pytest.approx(1.0)
    assert lr_at(60, c, 110) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(110, c, 110) == pytest.approx(0.1)
    assert lr_at(500, c, 110) == pytest.approx(0.1)


def test_linear_constant_wsd():
    assert lr_at(60, cfg(decay_style="linear"), 110) == pytest.approx(0.55)
    assert lr_at(100, cfg(decay_style="constant"), 110) == pytest.approx(1.0)
    w = cfg(decay_style="wsd", wsd_decay_fraction=0.2)
    assert lr_at(80, w, 110) == pytest.approx(1.0)  # progress 0.7 < 0.8: stable
    assert lr_at(100, w, 110) == pytest.approx(1.0 - 0.9 * 0.5)  # halfway through the decay
    assert lr_at(110, w, 110) == pytest.approx(0.1)


def test_decay_iters_override():
    c = cfg(decay_style="linear", decay_iters=60)
    assert lr_at(60, c, 1000) == pytest.approx(0.1)
    assert lr_at(35, c, 1000) == pytest.approx(0.55)
