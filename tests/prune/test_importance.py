"""Channel importance: filter norms (L1, L2) and first-order Taylor on calibration batches."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimkit.errors import ConfigError
from slimkit.prune import channel_groups, channel_importance
from slimkit.prune.importance import IMPORTANCE_METHODS, taylor_importance


class TwoProducers(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 3, 1, bias=False)
        self.b = nn.Conv2d(2, 3, 1, bias=False)
        self.head = nn.Conv2d(3, 1, 1)

    def forward(self, x):
        return self.head(self.a(x) + self.b(x))


def two_producers() -> TwoProducers:
    model = TwoProducers()
    with torch.no_grad():
        model.a.weight.copy_(torch.tensor([[1.0, -2.0], [0.0, 0.5], [3.0, 0.0]]).view(3, 2, 1, 1))
        model.b.weight.copy_(torch.tensor([[0.0, 1.0], [-4.0, 0.0], [0.0, 0.0]]).view(3, 2, 1, 1))
    return model


def test_l1_importance_sums_the_filters_of_every_producer():
    model = two_producers()
    group = next(g for g in channel_groups(model, torch.zeros(1, 2, 2, 2)) if g.prunable)
    assert [m.module for m in group.producers] == ["a", "b"]
    torch.testing.assert_close(channel_importance(model, group), torch.tensor([4.0, 4.5, 3.0]))


def test_l2_importance_is_the_norm_of_all_producers_rows_together():
    model = two_producers()
    group = next(g for g in channel_groups(model, torch.zeros(1, 2, 2, 2)) if g.prunable)
    expected = torch.tensor([6.0, 16.25, 9.0]).sqrt()  # 1 + 4 + 1, 0.25 + 16, 9
    torch.testing.assert_close(channel_importance(model, group, "l2"), expected)


def test_unknown_importance_and_groups_without_producers_are_refused():
    model = TwoProducers()
    groups = channel_groups(model, torch.zeros(1, 2, 2, 2))
    assert IMPORTANCE_METHODS == ("l1", "l2", "taylor")
    with pytest.raises(ConfigError, match="importance 'l3' is not known; choose one of l1, l2, taylor"):
        channel_importance(model, groups[1], "l3")
    with pytest.raises(ConfigError, match="has no Conv or Linear producing it"):
        channel_importance(model, groups[0])  # the model's input channels
    with pytest.raises(ConfigError, match="'taylor' needs calibration batches"):
        channel_importance(model, groups[1], "taylor")


# -- Taylor --------------------------------------------------------------------------------

class ConvBNHead(nn.Module):
    """conv -> bn -> relu -> flatten -> Linear: a channel is a block of 4 Linear inputs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 2 * 2, 3)

    def forward(self, x):
        return self.fc(torch.flatten(F.relu(self.bn(self.conv(x))), 1))


def conv_bn_head() -> ConvBNHead:
    torch.manual_seed(0)
    model = ConvBNHead()
    with torch.no_grad():
        model.bn.weight.uniform_(0.5, 1.5)
        model.bn.bias.uniform_(-0.5, 0.5)
        model.bn.running_mean.uniform_(-0.2, 0.2)
    return model.eval()


def batches():
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(5, 2, 2, 2, generator=g), torch.randint(0, 3, (5,), generator=g)) for _ in range(3)]


def ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def test_taylor_is_the_magnitude_of_w_times_grad_over_every_member_summed_over_batches():
    model = conv_bn_head()
    group = next(g for g in channel_groups(model, torch.zeros(1, 2, 2, 2)) if g.prunable)
    expected = torch.zeros(4)
    for batch in batches():
        model.zero_grad()
        ce(model, batch).backward()
        per = sum(
            (p * p.grad).flatten(1).sum(1) if p.dim() > 1 else p * p.grad
            for p in (model.conv.weight, model.conv.bias, model.bn.weight, model.bn.bias)
        )
        # Linear inputs: channel c is features 4c .. 4c+3
        per = per + (model.fc.weight * model.fc.weight.grad).view(3, 4, 4).sum((0, 2))
        expected += per.detach().abs()
    model.zero_grad(set_to_none=True)
    scores = channel_importance(model, group, "taylor", calibration=batches(), loss_fn=ce)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-7)


def test_taylor_leaves_modes_flags_and_grads_as_they_were():
    model = conv_bn_head().train()
    model.conv.weight.requires_grad_(False)
    group = next(g for g in channel_groups(model, torch.zeros(1, 2, 2, 2)) if g.prunable)
    stats = model.bn.running_mean.clone()
    default = taylor_importance(model, [group], [b[0] for b in batches()])[0]
    assert model.training and not model.conv.weight.requires_grad and model.conv.bias.requires_grad
    assert all(p.grad is None for p in model.parameters())
    torch.testing.assert_close(model.bn.running_mean, stats, rtol=0, atol=0)
    # the default label-free probe is seeded: the same scores every time, all positive here
    torch.testing.assert_close(taylor_importance(model, [group], [b[0] for b in batches()])[0], default, rtol=0, atol=0)
    assert bool((default > 0).all())


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.conv1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU())
        self.conv2 = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        s = self.stem(x)
        return self.head(F.relu(s + self.conv2(self.dw(self.conv1(s)))).mean((2, 3)))


@pytest.mark.parametrize("method", ["l1", "l2", "taylor"])
@pytest.mark.parametrize("which", ["stream", "hidden"])
def test_every_importance_ranks_a_zeroed_channel_last(method, which):
    torch.manual_seed(0)
    model = Residual().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):  # positive shifts: no channel is dead after ReLU
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    groups = [g for g in channel_groups(model, x) if g.prunable]
    group = groups[0] if which == "stream" else groups[1]
    assert [m.role for m in group.producers] == (["out", "out"] if which == "stream" else ["out", "depthwise"])
    with torch.no_grad():  # zero channel 5 wherever it is produced, batch norms included
        for m in group.members:
            if m.role != "in":
                for p in (model.get_submodule(m.module).weight, model.get_submodule(m.module).bias):
                    p[5] = 0
    calibration = [torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(s)) for s in range(2)]
    scores = channel_importance(model, group, method, calibration=calibration)
    assert int(scores.argmin()) == 5 and float(scores[5]) == 0.0
    assert bool((scores[torch.arange(8) != 5] > 0).all())
