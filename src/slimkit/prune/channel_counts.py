"""How many channels each group keeps, and which: the arithmetic channel pruning and its
sensitivity analysis share."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from slimkit.prune.channels import ChannelGroup


def group_key(group: ChannelGroup) -> str:
    """The name of a group: the qualified name of its first producing module.

    Stable for a given architecture: analysing a freshly built copy gives the same keys.
    """
    producers = group.producers
    return producers[0].module if producers else f"#{group.index}"


def prunable_groups(groups: Iterable[ChannelGroup]) -> list[ChannelGroup]:
    """The groups whose channels may be removed and that have filters to score."""
    return [g for g in groups if g.prunable and g.producers]


def kept_channels(size: int, ratio: float, round_to: int = 1, min_channels: int = 1) -> int:
    """How many of ``size`` channels a group keeps when ``ratio`` of them are removed.

    ``floor(ratio * size)`` channels are removed; the rest is rounded up to a multiple of
    ``round_to`` and raised to ``min_channels``, never beyond ``size``.
    """
    return _rounded(size, size - math.floor(ratio * size + 1e-9), round_to, min_channels)


def _rounded(size: int, keep: int, round_to: int, min_channels: int) -> int:
    keep = max(keep, min_channels)
    return min(-(-keep // round_to) * round_to, size)


def top_channels(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the ``n`` highest ``scores``, ascending; ties keep the lower index."""
    # A stable sort keeps the lower index among equal scores, so the choice is reproducible.
    return torch.sort(scores, descending=True, stable=True).indices[:n].sort().values
