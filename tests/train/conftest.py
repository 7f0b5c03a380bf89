"""Fixtures of the training tests."""

from __future__ import annotations

import pytest

from moe_recipes.train import trainer


@pytest.fixture
def nothing_expensive(monkeypatch):
    """Make the rendezvous and the model load fail loudly: a preflight error must come before them."""

    def forbidden(*args, **kwargs):
        raise AssertionError("reached an expensive step before the cheap checks failed")

    monkeypatch.setattr(trainer, "init_distributed", forbidden)
    monkeypatch.setattr(trainer, "load_model", forbidden)
