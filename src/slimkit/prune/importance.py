"""How much each channel of a channel group matters, to choose which ones to keep."""

from __future__ import annotations

import torch
from torch import nn

from slimkit.errors import ConfigError
from slimkit.prune.channels import ChannelGroup

IMPORTANCE_METHODS = ("l1",)


def channel_importance(model: nn.Module, group: ChannelGroup, method: str = "l1") -> torch.Tensor:
    """A score per channel of ``group``; higher means more worth keeping.

    ``l1``: the L1 norm of the filters that produce each channel, summed over the group's
    producers (every Conv/Linear writing to it, depthwise convolutions included), as in
    Li et al., "Pruning Filters for Efficient ConvNets" (2017). Residual streams have
    several producers; their norms add up.

    Args:
        model: the model the group was found in.
        group: a group from :func:`slimkit.prune.channel_groups`.
        method: ``l1``.

    Returns:
        A float32 tensor of ``group.size`` scores, on the CPU.

    Raises:
        ConfigError: an unknown method, or a group without producers to score.
    """
    if method not in IMPORTANCE_METHODS:
        raise ConfigError(f"importance {method!r} is not known; choose one of {', '.join(IMPORTANCE_METHODS)}")
    producers = group.producers
    if not producers:
        raise ConfigError(f"{group!r} has no Conv or Linear producing it, so there are no filters to score")
    scores = torch.zeros(group.size)
    for member in producers:
        weight = model.get_submodule(member.module).weight.detach()
        rows = weight[member.offset : member.offset + group.size]
        scores += rows.abs().flatten(1).sum(1).float().cpu()
    return scores
