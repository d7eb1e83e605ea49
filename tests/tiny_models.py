"""Tiny seeded models for tests, importable as ``tiny_models:<function>`` model specs.

Every factory returns ``(module, example_inputs)`` as slimkit's callable loader expects.
"""

from __future__ import annotations

import math

import torch
from torch import nn

SPEC_MLP = {"kind": "callable", "ref": "tiny_models:mlp"}


def mlp() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """``Linear(64, 128) -> ReLU -> Linear(128, 32)``, seeded; input ``[4, 64]``."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32)).eval()
    return module, (inputs(4),)


def inputs(batch: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 64, generator=g)


class EmbedMLP(nn.Module):
    """Token ids -> Embedding(100, 64) -> mean over tokens -> Linear(64, 16)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(100, 64)
        self.head = nn.Linear(64, 16)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(ids).mean(1))


def embed_mlp() -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    ids = torch.arange(24).reshape(3, 8) % 100
    return EmbedMLP().eval(), (ids,)


def ragged_mlp() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """The middle Linear has 48 inputs, not a multiple of 32: int4 leaves it in fp32."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 8))
    return module.eval(), (inputs(4),)


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    """10 log10(signal power / error power) in dB."""
    ref, out = ref.detach().double(), out.detach().double()
    return 10.0 * math.log10(float((ref**2).sum()) / float(((ref - out) ** 2).sum()))


def min_cosine(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float(nn.functional.cosine_similarity(ref.double(), out.double(), dim=-1).min())


def wide() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """Two ``Linear(256, 256)`` layers: big enough that a file's size is its weights."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256)).eval()
    return module, (torch.randn(2, 256, generator=torch.Generator().manual_seed(1)),)


def mlp_seq() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """The same MLP with a ``[2, 5, 64]`` input: exported Linears become MatMul + Add."""
    module, _ = mlp()
    return module, (torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1)),)
