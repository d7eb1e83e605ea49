"""LeNet-300-100 and LeNet-5, the MNIST networks of Deep Compression (Han et al., 2016).

Both take 28x28 greyscale images (``[N, 28, 28]`` or ``[N, 1, 28, 28]``) and return
logits. LeNet-5 here is the Caffe variant the paper compressed: two 5x5 convolutions (20
and 50 filters, no padding) each followed by 2x2 max pooling, then fully connected layers
of 500 and ``num_classes`` units: 431,080 parameters for 10 classes. LeNet-300-100 is the
784-300-100-10 :class:`slimkit.zoo.mlp.MLP` (266,610 parameters).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slimkit.zoo.mlp import MLP


def lenet_300_100(num_classes: int = 10) -> MLP:
    """The 784-300-100 fully connected net (ReLU), as an :class:`MLP`."""
    return MLP(784, [300, 100], num_classes)


class LeNet5(nn.Module):
    """Caffe's LeNet-5: conv(20, 5x5) - pool - conv(50, 5x5) - pool - fc(500) - fc(classes)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(1, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(50 * 4 * 4, 500)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [N, 28, 28] (as the Fashion-MNIST loader gives images), [N, 784] or [N, 1, 28, 28];
        # one reshape rather than a branch on the shape, so that torch.fx can trace it.
        x = x.reshape(x.shape[0], 1, 28, 28)
        x = self.pool(self.conv1(x))
        x = self.pool(self.conv2(x))
        x = torch.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)

    @property
    def spec(self) -> dict[str, Any]:
        """JSON description from which :func:`slimkit.zoo.models.build_from_spec` rebuilds it."""
        return {"kind": "lenet5", "num_classes": self.num_classes}
