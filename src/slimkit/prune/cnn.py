"""Pruning CNN channels: choose how many channels each group keeps, and which ones.

The dependency analysis (:func:`slimkit.prune.channel_groups`) says which channels must go
together; an importance score (:mod:`slimkit.prune.importance`) ranks them; this module
turns a pruning ratio (one for all groups, one per group, or one global budget) into the
channels each group keeps, and removes the rest with :func:`slimkit.prune.shrink_`.

A group is named by its *key*: the qualified name of the first module that produces its
channels (:func:`group_key`). A residual stream written by several blocks has one key,
the first block's projection; any of its producers' names selects it in ``ratio``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from slimkit.config import SlimConfig
from slimkit.errors import ConfigError
from slimkit.prune.api import Pruned
from slimkit.prune.channel_counts import (
    _rounded,
    group_key,
    kept_channels,
    prunable_groups,
    top_channels,
)
from slimkit.prune.channels import (
    CONV_TYPES,
    NORM_TYPES,
    ChannelGroup,
    analyse,
    extent,
    shrink_,
    shrink_checked_,
    slice_channels,
)
from slimkit.prune.importance import LossFn, channel_importance, taylor_importance
from slimkit.prune.sensitivity import channel_costs, channel_sensitivity, ratios_for_budget
from slimkit.registry import register

_ROLES = ("out", "in", "norm", "depthwise")


class ChannelBudget(BaseModel):
    """Prune to a MAC or parameter budget, each group's ratio chosen by a sensitivity analysis.

    Every prunable group is pruned alone at each of ``ratios`` and the model scored by the
    evaluation function the caller gives (in a recipe: top-1 accuracy on ``images`` train
    images held out from training); then :func:`slimkit.prune.ratios_for_budget` picks
    the per-group ratios that meet the budget while losing the least.

    Attributes:
        macs: the fraction of the multiply-accumulates to keep, in ``(0, 1]``.
        params: or the fraction of the parameters to keep.
        ratios: the fractions of a group's channels removed that the analysis measures.
        images: held-out train images each trial is evaluated on (in a recipe).
        seed: which train images are held out (in a recipe).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    macs: float | None = Field(None, gt=0, le=1)
    params: float | None = Field(None, gt=0, le=1)
    ratios: list[float] = Field(default_factory=lambda: [0.25, 0.5, 0.75], min_length=1)
    images: int = Field(500, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _one_target(self) -> ChannelBudget:
        if (self.macs is None) == (self.params is None):
            raise ValueError("give one budget: macs (fraction of MACs kept) or params (fraction of parameters kept)")
        if not all(0 < r < 1 for r in self.ratios):
            raise ValueError("ratios: each is a fraction of a group's channels removed, in (0, 1)")
        return self

    @property
    def kind(self) -> Literal["macs", "params"]:
        return "macs" if self.macs is not None else "params"

    @property
    def target(self) -> float:
        return float(self.macs if self.macs is not None else self.params)


class ChannelPruneConfig(SlimConfig):
    """Remove output channels of convolutions, and everything tied to them.

    Attributes:
        ratio: the fraction of channels removed, in ``[0, 1)``: one number for every
            prunable group, or ``{group: ratio}`` where a group is named by any of its
            producing modules (or a ``re:`` regex matching one); groups not named are left
            whole. With ``scope="global"`` it must be one number.
        scope: ``per_group`` removes ``ratio`` of each group's channels; ``global`` removes
            ``ratio`` of all prunable channels together, the least important first, after
            dividing each group's scores by their mean so that groups are comparable.
            Global pruning cuts unimportant groups more and important ones less.
        importance: ``l1`` or ``l2`` (filter norms; no data needed) or ``taylor`` (first
            order Taylor on calibration batches; see
            :func:`slimkit.prune.importance.taylor_importance`).
        round_to: each group keeps a multiple of this many channels (8 suits vector
            units and tensor cores). Counts are rounded up, so at most ``ratio`` is removed.
        min_channels: no group keeps fewer channels than this.
        exclude: modules (qualified names or ``re:`` regexes) that are neither traced nor
            resized; the channels flowing into and out of them are left whole.
        example_input_shape: the shape of a float input the model accepts, e.g.
            ``[1, 3, 224, 224]``, used to trace it. The handler's ``example_input``
            argument overrides it.
        budget: instead of ``ratio``, prune to a MAC or parameter budget with per-group
            ratios chosen by a sensitivity analysis (see :class:`ChannelBudget`); needs an
            ``evaluate`` function, and records the analysis with the result.
        kept: the structure the pruning left, which :func:`slimkit.prune_` records with
            the model: the new size of every resized module dimension, keyed
            ``"module:role"`` (role ``out``, ``in``, ``norm`` or ``depthwise``), e.g.
            ``{"features.2.conv.0.0:out": 48}``. When set, it decides alone: the modules
            are resized to it, keeping their first channels (loading a saved model then
            overwrites their values), and nothing is traced or scored.
    """

    kind = "prune"
    method = "channels"
    ratio: float | dict[str, float] = 0.5
    scope: Literal["per_group", "global"] = "per_group"
    importance: Literal["l1", "l2", "taylor"] = "l1"
    round_to: int = Field(1, ge=1)
    min_channels: int = Field(1, ge=1)
    exclude: list[str] = Field(default_factory=list)
    example_input_shape: list[int] | None = None
    budget: ChannelBudget | None = None
    kept: dict[str, int] | None = None

    @field_validator("ratio")
    @classmethod
    def _ratio_in_range(cls, v: float | dict[str, float]) -> float | dict[str, float]:
        values = v.values() if isinstance(v, dict) else [v]
        if not all(0 <= r < 1 for r in values):
            raise ValueError("every ratio must be a fraction of channels removed, in [0, 1)")
        for key in v if isinstance(v, dict) else ():
            if key.startswith("re:"):
                try:
                    re.compile(key[3:])
                except re.error as e:
                    raise ValueError(f"bad regex {key!r}: {e}") from None
        return v

    @field_validator("example_input_shape")
    @classmethod
    def _shape_positive(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or any(d < 1 for d in v)):
            raise ValueError("give the input's full shape with positive sizes, e.g. [1, 3, 224, 224]")
        return v

    @model_validator(mode="after")
    def _global_needs_one_ratio(self) -> ChannelPruneConfig:
        if self.scope == "global" and isinstance(self.ratio, dict):
            raise ValueError("scope 'global' takes one ratio for all groups, not a ratio per group")
        if self.budget is not None and self.scope == "global":
            raise ValueError("a budget chooses per-group ratios from its sensitivity analysis; remove scope: global")
        return self

    @field_validator("kept")
    @classmethod
    def _kept_keys(cls, v: dict[str, int] | None) -> dict[str, int] | None:
        for key, size in (v or {}).items():
            if key.rpartition(":")[2] not in _ROLES or size < 1:
                raise ValueError(f"{key}={size}: keys are 'module:role' with role one of {', '.join(_ROLES)}, sizes >= 1")
        return v

    def replay_on(self, layers: list[str]) -> ChannelPruneConfig:
        """The recorded structure: loading only resizes modules, it traces and scores nothing."""
        if self.kept is None:
            raise ConfigError(
                "a recorded channels transform has no `kept` structure; it was recorded without "
                "slimkit.prune_, so save the model again after pruning it with prune_"
            )
        return self


@register(ChannelPruneConfig)
def prune_channels(
    model: nn.Module,
    config: ChannelPruneConfig,
    example_input: torch.Tensor | tuple | None = None,
    calibration: Iterable[Any] | None = None,
    loss_fn: LossFn | None = None,
    evaluate: Callable[[nn.Module], float] | None = None,
    **_: Any,
) -> Pruned:
    """Remove channels of ``model`` in place as ``config`` says; use :func:`slimkit.prune_`.

    Args:
        model: a CNN ``torch.fx`` can trace (apart from ``config.exclude``).
        config: the ratio, scope and importance.
        example_input: an input the model accepts, to trace it; else a zero tensor of
            ``config.example_input_shape``.
        calibration: batches from the train split, for ``importance="taylor"``.
        loss_fn: ``loss_fn(model, batch) -> loss`` for ``taylor``; default a label-free
            probe of the output (see :func:`slimkit.prune.importance.taylor_importance`).
        evaluate: ``evaluate(model) -> metric`` (higher is better) on held-out data that is
            not the test split, for ``config.budget``'s sensitivity analysis.

    Returns:
        The qualified names of the modules that changed, sorted, and the config with
        ``kept`` filled in: the new size of every module dimension that shrank, from
        which loading a saved model rebuilds the architecture.

    Raises:
        ConfigError: no example input, a ratio naming no prunable group, ``taylor``
            without calibration batches, or a shrunk model whose shapes differ from what
            the channel analysis predicted on the example input (the message names the
            first module concerned; the model is then left as it was).
        UntraceableModel: torch.fx cannot trace the model; the message names the module
            to put in ``exclude``.
    """
    if config.kept is not None:
        return Pruned(_resize(model, config.kept), config)
    x = _example(model, config, example_input)
    chosen_by = None  # how a budget chose the ratios
    if config.budget is not None:
        config, chosen_by = _config_for_budget(model, x, config, evaluate, calibration, loss_fn)
    analysis = analyse(model, x, config.exclude)
    groups = analysis.groups
    ratios = _ratios(groups, config)
    chosen = [g for g in ratios if ratios[g] > 0]
    if config.importance == "taylor":
        scores = dict(zip(chosen, taylor_importance(model, chosen, calibration, loss_fn), strict=True))
    else:
        scores = {g: channel_importance(model, g, config.importance) for g in chosen}
    if config.scope == "global":
        counts = _global_counts(scores, float(config.ratio), config.round_to, config.min_channels)
    else:
        counts = {g: kept_channels(g.size, ratios[g], config.round_to, config.min_channels) for g in chosen}
    keep = {g: top_channels(scores[g], n) for g, n in counts.items() if n < g.size}
    shrink_checked_(model, keep, analysis, x)
    kept = _new_sizes(model, keep)
    return Pruned(sorted({key.rpartition(":")[0] for key in kept}), config.model_copy(update={"kept": kept}),
                  chosen_by)


def _config_for_budget(model: nn.Module, x: Any, config: ChannelPruneConfig, evaluate, calibration,
                       loss_fn) -> tuple[ChannelPruneConfig, dict[str, Any]]:
    """``config`` with the per-group ratios that meet its budget, and the analysis that chose them."""
    budget = config.budget
    assert budget is not None
    if evaluate is None:
        raise ConfigError(
            "a channel pruning budget chooses each group's ratio by evaluating the pruned model: pass "
            "evaluate=<model -> metric on held-out train data> (a recipe does), or give ratio instead"
        )
    costs = channel_costs(model, x, budget.kind, config.exclude)
    sensitivity = channel_sensitivity(
        model, x, evaluate, budget.ratios, importance=config.importance, round_to=config.round_to,
        min_channels=config.min_channels, exclude=config.exclude, calibration=calibration, loss_fn=loss_fn)
    choice = ratios_for_budget(sensitivity, costs, budget.target)
    chosen = config.model_copy(update={"ratio": choice["ratios"]})
    return chosen, {"sensitivity": sensitivity, "choice": choice, "metric": "validation accuracy"}


def shrink_and_describe(model: nn.Module, keep: Mapping[ChannelGroup, torch.Tensor | Sequence[int]]) -> dict[str, int]:
    """:func:`slimkit.prune.shrink_`, returning the new size of each module dimension that shrank.

    The result, keyed ``"module:role"`` and sorted, is what ``ChannelPruneConfig.kept``
    holds: enough to resize a freshly built model to the same shapes.
    """
    shrink_(model, keep)
    return _new_sizes(model, keep)


def _new_sizes(model: nn.Module, keep: Iterable[ChannelGroup]) -> dict[str, int]:
    modules = dict(model.named_modules())
    sizes = {}
    for group in keep:
        for m in group.members:
            size = extent(modules[m.module], m.role)
            if size != m.extent:
                sizes[f"{m.module}:{m.role}"] = size
    return dict(sorted(sizes.items()))


def _resize(model: nn.Module, sizes: Mapping[str, int]) -> list[str]:
    """Resize module dimensions to the recorded sizes, keeping their first channels.

    Nothing is changed unless every entry fits the model.
    """
    problems, plan = [], []
    for key, size in sizes.items():
        name, _, role = key.rpartition(":")
        try:
            module = model.get_submodule(name)
        except AttributeError:
            problems.append(f"{name!r}: the saved record names a module this model does not have")
            continue
        if not isinstance(module, (*CONV_TYPES, nn.Linear, *NORM_TYPES)) or not 0 < size <= extent(module, role):
            problems.append(f"{key}={size}: cannot resize {type(module).__name__} {name!r} to that")
            continue
        plan.append((module, role, size))
    if problems:
        raise ConfigError(problems)
    for module, role, size in plan:
        if extent(module, role) != size:
            slice_channels(module, role, torch.arange(size))
    return sorted({key.rpartition(":")[0] for key in sizes})


def _example(model: nn.Module, config: ChannelPruneConfig, example_input: Any) -> Any:
    if example_input is not None:
        return example_input
    if config.example_input_shape is None:
        raise ConfigError(
            "channel pruning traces the model on an example input: pass example_input=... or "
            "set example_input_shape, e.g. [1, 3, 224, 224]"
        )
    p = next(model.parameters(), None)
    return torch.zeros(config.example_input_shape, device=p.device if p is not None else None)


def _ratios(groups: list[ChannelGroup], config: ChannelPruneConfig) -> dict[ChannelGroup, float]:
    candidates = prunable_groups(groups)
    if not isinstance(config.ratio, dict):
        return {g: float(config.ratio) for g in candidates}
    problems, ratios = [], {}
    for pattern, ratio in config.ratio.items():
        hits = [g for g in groups if any(_matches(m.module, pattern) for m in g.producers)]
        if not hits:
            known = ", ".join(group_key(g) for g in candidates[:6]) + (", ..." if len(candidates) > 6 else "")
            problems.append(f"ratio: {pattern!r} produces no channel group; prunable groups are named like: {known}")
            continue
        usable = [g for g in hits if g in candidates]
        # A regex may sweep over fixed groups; an exact name of one is a mistake.
        if not usable or not pattern.startswith("re:"):
            for g in hits:
                if g not in candidates:
                    why = "; ".join(g.reasons) or "it has no filters to score"
                    problems.append(f"ratio: {pattern!r} names group {group_key(g)!r}, which cannot be pruned: {why}")
        for g in usable:
            if g in ratios and ratios[g] != ratio:
                problems.append(f"ratio: {pattern!r} gives group {group_key(g)!r} a second ratio ({ratios[g]} and {ratio})")
            else:
                ratios[g] = float(ratio)
    if problems:
        raise ConfigError(problems)
    return ratios


def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern


def _global_counts(scores: Mapping[ChannelGroup, torch.Tensor], ratio: float, round_to: int, min_channels: int) -> dict[ChannelGroup, int]:
    """Channels kept per group when ``ratio`` of all channels go, least important first."""
    entries = []
    for i, s in enumerate(scores.values()):
        mean = float(s.mean())
        normed = s / mean if mean > 0 else torch.zeros_like(s)
        entries += [(float(v), i, c) for c, v in enumerate(normed)]
    groups = list(scores)
    kept = {g: g.size for g in groups}
    floor = {g: min(g.size, max(min_channels, 1)) for g in groups}
    budget = math.floor(ratio * len(entries) + 1e-9)
    for _, i, _ in sorted(entries):
        if budget == 0:
            break
        g = groups[i]
        if kept[g] > floor[g]:
            kept[g] -= 1
            budget -= 1
    # Rounding goes up, so no group loses more than the global ranking gave it.
    return {g: _rounded(g.size, n, round_to, min_channels) for g, n in kept.items()}
