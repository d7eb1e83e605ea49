"""Multilayer perceptrons, as in the knowledge-distillation paper's MNIST experiment."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class MLP(nn.Module):
    """ReLU MLP on flattened inputs, with optional input and hidden dropout.

    Args:
        in_features: input size after flattening (784 for 28x28 images).
        hidden: width of each hidden layer.
        num_classes: number of output logits.
        dropout: dropout after each hidden layer.
        input_dropout: dropout on the input.
    """

    def __init__(self, in_features: int, hidden: list[int], num_classes: int, dropout: float = 0.0, input_dropout: float = 0.0):
        super().__init__()
        self.spec_args = {"in_features": in_features, "hidden": list(hidden), "num_classes": num_classes,
                          "dropout": dropout, "input_dropout": input_dropout}
        layers: list[nn.Module] = [nn.Flatten(), nn.Dropout(input_dropout)]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @property
    def spec(self) -> dict[str, Any]:
        """JSON description from which :func:`slimkit.zoo.models.build_from_spec` rebuilds it."""
        return {"kind": "mlp", **self.spec_args}
