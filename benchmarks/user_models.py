"""A user's own CNN, for the vision recipe run "with only model: changed".

Nothing here is slimkit's: a plain residual network written the way a user writes one,
given to slimkit as ``user_models:small_resnet`` (with this folder on ``PYTHONPATH``).
"""

from __future__ import annotations

import torch
from torch import nn


class Block(nn.Module):
    """Two 3x3 convolutions with batch norm and a residual add (a projection when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class SmallResNet(nn.Module):
    def __init__(self, classes: int = 10, width: int = 24):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layers = nn.Sequential(Block(width, width, 2), Block(width, 2 * width, 2), Block(2 * width, 4 * width, 2),
                                    Block(4 * width, 8 * width, 2))
        self.fc = nn.Linear(8 * width, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layers(self.stem(images)).mean((2, 3)))


def small_resnet() -> nn.Module:
    """A seeded, untrained SmallResNet for 10 classes."""
    torch.manual_seed(0)
    return SmallResNet()
