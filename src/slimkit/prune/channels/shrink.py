"""Removing a channel group's channels: slicing every module dimension that holds them."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from slimkit.errors import ConfigError
from slimkit.prune.channels.groups import ChannelGroup, Role
from slimkit.prune.channels.ops import NORM_TYPES


def shrink_(model: nn.Module, keep: Mapping[ChannelGroup, torch.Tensor | Sequence[int]]) -> list[str]:
    """Keep only the channels ``keep[group]`` of each group, slicing every member in place.

    Weights, biases, batch-norm statistics and the modules' sizes (``in_channels``,
    ``out_channels``, ``groups`` of depthwise convolutions, ``in_features``,
    ``out_features``, ``num_features``) all shrink, so the result is a smaller dense
    model. Parameters are replaced by new ones: create optimizers afterwards.

    Args:
        model: the model :func:`slimkit.prune.channel_groups` analysed, not shrunk since.
        keep: for each group to shrink, the indices of the channels to keep (any order;
            at least one). Groups not in ``keep`` are left whole.

    Returns:
        The qualified names of the modules that changed, sorted.

    Raises:
        ConfigError: every problem at once: a group that is not prunable (with its
            reasons), indices out of range, repeated or empty, or groups from an older
            analysis of the model (analyse it again after shrinking).
    """
    problems: list[str] = []
    plans: dict[tuple[str, str], list[tuple[int, int, int, torch.Tensor]]] = defaultdict(list)
    modules = dict(model.named_modules())
    for group, indices in keep.items():
        label = f"group #{group.index} ({group.size} channels)"
        if not group.prunable:
            problems.append(f"{label} cannot be shrunk: {'; '.join(group.reasons)}")
            continue
        idx = torch.as_tensor(indices).flatten()
        if idx.numel() == 0 or idx.dtype.is_floating_point or idx.dtype == torch.bool:
            problems.append(f"{label}: give at least one integer channel index to keep, got {indices!r}")
            continue
        idx = idx.long().cpu()
        if idx.min() < 0 or idx.max() >= group.size or len(idx.unique()) != len(idx):
            problems.append(f"{label}: indices must be distinct and between 0 and {group.size - 1}, got {idx.tolist()[:8]}")
            continue
        for m in group.members:
            module = modules.get(m.module)
            if module is None or extent(module, m.role) != m.extent:
                problems.append(
                    f"{label}: {m.module} no longer has {m.extent} {'inputs' if m.role == 'in' else 'outputs'}; "
                    "the groups come from an older analysis, run channel_groups again on the current model"
                )
                break
            plans[(m.module, m.role)].append((m.offset, m.block, group.size, idx.sort().values))
    if problems:
        raise ConfigError(problems)
    changed = set()
    with torch.no_grad():
        for (name, role), parts in plans.items():
            module = modules[name]
            size = extent(module, role)
            mask = torch.ones(size, dtype=torch.bool)
            for offset, block, n, idx in parts:
                mask[offset : offset + n * block] = False
                mask[(offset + idx[:, None] * block + torch.arange(block)).flatten()] = True
            if bool(mask.all()):
                continue
            slice_channels(module, role, mask.nonzero().flatten())
            changed.add(name)
    return sorted(changed)


def extent(module: nn.Module, role: Role) -> int:
    """The size of ``module`` along the dimension a member of role ``role`` slices."""
    if isinstance(module, NORM_TYPES):
        return module.num_features
    if isinstance(module, nn.Linear):
        return module.in_features if role == "in" else module.out_features
    return module.in_channels if role == "in" else module.out_channels


def slice_channels(module: nn.Module, role: Role, index: torch.Tensor) -> None:
    """Keep the channels ``index`` of ``module``'s ``role`` dimension: its tensors and sizes."""
    n = len(index)
    if role == "in":
        _replace(module, "weight", 1, index)
        if isinstance(module, nn.Linear):
            module.in_features = n
        else:
            module.in_channels = n
        return
    names = ("weight", "bias", "running_mean", "running_var") if isinstance(module, NORM_TYPES) else ("weight", "bias")
    for attr in names:
        _replace(module, attr, 0, index)
    if isinstance(module, NORM_TYPES):
        module.num_features = n
    elif isinstance(module, nn.Linear):
        module.out_features = n
    else:
        module.out_channels = n
        if role == "depthwise":
            module.in_channels = module.groups = n


def _replace(module: nn.Module, attr: str, dim: int, index: torch.Tensor) -> None:
    old = getattr(module, attr, None)
    if old is None:
        return
    new = old.detach().index_select(dim, index.to(old.device)).clone()
    if isinstance(old, nn.Parameter):
        setattr(module, attr, nn.Parameter(new, requires_grad=old.requires_grad))
    else:
        setattr(module, attr, new)
