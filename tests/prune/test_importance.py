"""L1 channel importance, summed over a group's producers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slimkit.errors import ConfigError
from slimkit.prune import channel_groups, channel_importance


class TwoProducers(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 3, 1, bias=False)
        self.b = nn.Conv2d(2, 3, 1, bias=False)
        self.head = nn.Conv2d(3, 1, 1)

    def forward(self, x):
        return self.head(self.a(x) + self.b(x))


def test_l1_importance_sums_the_filters_of_every_producer():
    model = TwoProducers()
    with torch.no_grad():
        model.a.weight.copy_(torch.tensor([[1.0, -2.0], [0.0, 0.5], [3.0, 0.0]]).view(3, 2, 1, 1))
        model.b.weight.copy_(torch.tensor([[0.0, 1.0], [-4.0, 0.0], [0.0, 0.0]]).view(3, 2, 1, 1))
    group = next(g for g in channel_groups(model, torch.zeros(1, 2, 2, 2)) if g.prunable)
    assert [m.module for m in group.producers] == ["a", "b"]
    torch.testing.assert_close(channel_importance(model, group), torch.tensor([4.0, 4.5, 3.0]))


def test_unknown_importance_and_groups_without_producers_are_refused():
    model = TwoProducers()
    groups = channel_groups(model, torch.zeros(1, 2, 2, 2))
    with pytest.raises(ConfigError, match="importance 'l2' is not known; choose one of l1"):
        channel_importance(model, groups[1], "l2")
    with pytest.raises(ConfigError, match="has no Conv or Linear producing it"):
        channel_importance(model, groups[0])  # the model's input channels
