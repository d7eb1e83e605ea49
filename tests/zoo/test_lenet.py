"""LeNet-5 and LeNet-300-100: the paper's parameter counts, shapes, save and reload."""

import torch

from slimkit import serialize
from slimkit.zoo.lenet import LeNet5, lenet_300_100
from slimkit.zoo.models import LoadedModel


def count(m):
    return sum(p.numel() for p in m.parameters())


def test_parameter_counts_are_the_papers():
    # Deep Compression, Table 2 and 3: 267K and 431K weights (biases included here).
    assert count(lenet_300_100()) == 784 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10 == 266_610
    assert count(LeNet5()) == (20 * 25 + 20) + (50 * 20 * 25 + 50) + (800 * 500 + 500) + (500 * 10 + 10) == 431_080


def test_lenet5_takes_every_image_layout():
    torch.manual_seed(0)
    net = LeNet5().eval()
    x = torch.rand(3, 28, 28)
    out = net(x)
    assert out.shape == (3, 10)
    torch.testing.assert_close(net(x.unsqueeze(1)), out)
    torch.testing.assert_close(net(x.reshape(3, 784)), out)


def test_lenet5_saves_and_reloads_bit_exact(tmp_path):
    torch.manual_seed(0)
    net = LeNet5(num_classes=7).eval()
    serialize.save(LoadedModel(net, net.spec, None, None, (torch.zeros(1, 1, 28, 28),)), tmp_path / "m")
    again = serialize.load(tmp_path / "m")
    x = torch.rand(2, 28, 28)
    torch.testing.assert_close(again.module(x), net(x), rtol=0, atol=0)


def test_lenet5_is_traceable_for_channel_pruning():
    from slimkit.prune import channel_groups

    groups = channel_groups(LeNet5().eval(), torch.rand(2, 28, 28))
    prunable = sorted(g.size for g in groups if g.prunable)
    assert prunable == [20, 50, 500]  # conv1, conv2 (its channels reach fc1 in 4x4 blocks), fc1
