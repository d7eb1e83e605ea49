"""How much each channel of a channel group matters, to choose which ones to keep.

Two kinds of score:

- from the weights alone (``l1``, ``l2``): the norm of the filters that compute each
  channel. Cheap, needs no data, and blind to what the rest of the network does with the
  channel;
- first-order Taylor (``taylor``): how much a loss would change, to first order, if the
  channel were removed, measured on calibration batches. It needs data and a backward
  pass per batch, and sees every place the channel lives, consumers included.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from slimkit.batches import call_with, to_device
from slimkit.errors import ConfigError
from slimkit.modes import eval_mode
from slimkit.prune.channels import ChannelGroup, Member

WEIGHT_METHODS = ("l1", "l2")
"""Scores computed from the weights alone, with no data."""
IMPORTANCE_METHODS = (*WEIGHT_METHODS, "taylor")

LossFn = Callable[[nn.Module, Any], torch.Tensor]


def channel_importance(
    model: nn.Module,
    group: ChannelGroup,
    method: str = "l1",
    *,
    calibration: Iterable[Any] | None = None,
    loss_fn: LossFn | None = None,
) -> torch.Tensor:
    """A score per channel of ``group``; higher means more worth keeping.

    ``l1``: the L1 norm of the filters that produce each channel, summed over the group's
    producers (every Conv/Linear writing to it, depthwise convolutions included), as in
    Li et al., "Pruning Filters for Efficient ConvNets" (2017). Residual streams have
    several producers; their norms add up.

    ``l2``: the L2 norm of the same filters, all producers' rows taken as one vector.

    ``taylor``: see :func:`taylor_importance`; needs ``calibration``. To score many groups,
    call :func:`taylor_importance` once: it needs one backward pass per batch for all
    of them.

    Args:
        model: the model the group was found in.
        group: a group from :func:`slimkit.prune.channel_groups`.
        method: ``l1``, ``l2`` or ``taylor``.
        calibration: for ``taylor``, the batches (see :func:`taylor_importance`).
        loss_fn: for ``taylor``, the loss (see :func:`taylor_importance`).

    Returns:
        A float32 tensor of ``group.size`` scores, on the CPU.

    Raises:
        ConfigError: an unknown method, a group without producers to score, or
            ``taylor`` without calibration batches.
    """
    if method not in IMPORTANCE_METHODS:
        raise ConfigError(f"importance {method!r} is not known; choose one of {', '.join(IMPORTANCE_METHODS)}")
    if method == "taylor":
        return taylor_importance(model, [group], calibration, loss_fn)[0]
    producers = group.producers
    if not producers:
        raise ConfigError(f"{group!r} has no Conv or Linear producing it, so there are no filters to score")
    scores = torch.zeros(group.size)
    for member in producers:
        weight = model.get_submodule(member.module).weight.detach()
        rows = weight[member.offset : member.offset + group.size].flatten(1).float().cpu()
        scores += rows.abs().sum(1) if method == "l1" else rows.square().sum(1)
    return scores if method == "l1" else scores.sqrt()


def taylor_importance(
    model: nn.Module,
    groups: Sequence[ChannelGroup],
    calibration: Iterable[Any] | None,
    loss_fn: LossFn | None = None,
) -> list[torch.Tensor]:
    """First-order Taylor scores of every channel of ``groups``, from one pass over the data.

    Removing channel ``c`` sets every parameter that belongs to it to zero: its filters and
    biases in the producers and depthwise convolutions, its batch-norm scale and shift,
    and its input columns in the consumers. To first order that changes the loss by
    ``-sum(w * dL/dw)`` over those parameters ``w``. The score of ``c`` is the magnitude of
    that sum, computed per batch and added up over the batches (Molchanov et al.,
    "Importance Estimation for Neural Network Pruning", 2019).

    Without ``loss_fn``, the loss of a batch is ``<r, model(batch)>`` with ``r`` a fixed
    draw of standard normal noise of the output's shape. Its first-order change is the
    output's change projected on ``r``, whose expected magnitude is proportional to how
    far removing the channel moves the output; no labels are needed. (The squared
    distance to the unpruned output would be the obvious label-free loss, but its gradient
    is zero at the unpruned model, so its first-order term says nothing.)

    The model runs in eval mode (batch norm uses its running statistics, dropout is off);
    its modes, ``requires_grad`` flags and ``.grad`` fields are left as they were.

    Args:
        model: the model the groups were found in.
        groups: groups from :func:`slimkit.prune.channel_groups`.
        calibration: batches from the train split: each a tensor, a tuple of positional
            inputs, or a dict of keyword inputs (moved to the model's device).
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``, e.g. the task loss on
            labelled batches. It must call ``model`` itself.

    Returns:
        One float32 CPU tensor of ``group.size`` scores per group, in order.

    Raises:
        ConfigError: no calibration batches, or no loss_fn for a model whose output is
            not a tensor.
    """
    batches = list(calibration or ())
    if not batches:
        raise ConfigError(
            "importance 'taylor' needs calibration batches from the train split: pass "
            "calibration=[batch, ...], or use importance 'l1' or 'l2', which need no data"
        )
    modules = dict(model.named_modules())
    params: dict[int, nn.Parameter] = {}
    slices: list[list[tuple[Member, str]]] = []
    for group in groups:
        parts = []
        for member in group.members:
            for attr in _channel_params(member):
                p = getattr(modules[member.module], attr, None)
                if isinstance(p, nn.Parameter):
                    params[id(p)] = p
                    parts.append((member, attr))
        slices.append(parts)
    plist = list(params.values())
    scores = [torch.zeros(g.size) for g in groups]
    if not plist:
        return scores
    device = plist[0].device
    flags = {id(p): p.requires_grad for p in model.parameters()}
    probe = torch.Generator().manual_seed(0)
    with eval_mode(model):
        try:
            for p in plist:
                p.requires_grad_(True)
            for batch in batches:
                batch = to_device(batch, device)
                with torch.enable_grad():
                    if loss_fn is not None:
                        loss = loss_fn(model, batch)
                    else:
                        out = call_with(model, batch)
                        if not isinstance(out, torch.Tensor):
                            raise ConfigError(
                                f"importance 'taylor': the model returns {type(out).__name__}, not a tensor; "
                                "pass loss_fn(model, batch) -> scalar loss"
                            )
                        r = torch.randn(out.shape, generator=probe).to(out)
                        loss = (out * r).sum()
                grads = torch.autograd.grad(loss, plist, allow_unused=True)
                by_id = {id(p): g for p, g in zip(plist, grads, strict=True)}
                for group, parts, total in zip(groups, slices, scores, strict=True):
                    step = torch.zeros(group.size, dtype=torch.float64)
                    for member, attr in parts:
                        p = getattr(modules[member.module], attr)
                        g = by_id[id(p)]
                        if g is not None:
                            step += _per_channel(p.detach() * g, member, group.size).double().cpu()
                    total += step.abs().float()
        finally:
            for p in model.parameters():
                p.requires_grad_(flags.get(id(p), p.requires_grad))
    return scores


def _channel_params(member: Member) -> tuple[str, ...]:
    # Running statistics are buffers: they have no gradient and are not parameters.
    return ("weight",) if member.role == "in" else ("weight", "bias")


def _per_channel(t: torch.Tensor, member: Member, size: int) -> torch.Tensor:
    """Sum ``t`` (shaped like the member's parameter) over everything but the group's channels."""
    rows = t.movedim(member.dim, 0)[member.offset : member.offset + size * member.block]
    return rows.reshape(size, -1).sum(1)
