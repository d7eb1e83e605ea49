"""eval_mode: eval inside, each module's own mode back afterwards."""

from __future__ import annotations

import pytest
from torch import nn

from slimkit.modes import eval_mode


def mixed() -> nn.Sequential:
    """A training model with a frozen (eval-mode) batch norm inside."""
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Sequential(nn.Dropout(0.5), nn.ReLU()))
    model.train()
    model[1].eval()
    return model


def modes(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


def test_every_module_gets_its_own_mode_back():
    model = mixed()
    before = modes(model)
    assert before == [True, True, False, True, True, True]
    with eval_mode(model) as m:
        assert m is model and not any(modes(model))
    assert modes(model) == before


def test_modes_come_back_after_an_exception():
    model = mixed()
    before = modes(model)
    with pytest.raises(RuntimeError, match="boom"), eval_mode(model):
        raise RuntimeError("boom")
    assert modes(model) == before
