"""Unstructured magnitude pruning: per layer or global, one-shot or gradual, and N:M.

A pruned layer keeps its type (``nn.Linear``, ``nn.Conv2d``). Its weight becomes a
parametrization (:mod:`torch.nn.utils.parametrize`): every access computes
``where(mask, original, 0)`` from the trainable ``original`` and a boolean ``mask``
buffer. This is chosen over a hook that zeroes weights after each step because

- pruned weights are zero whatever the optimizer does (momentum and weight decay move
  ``original``, never the weight the layer uses), and their gradients are zero;
- the mask is in the ``state_dict``, so the distillation trainer's checkpoints (which
  save ``state_dict``) restore it with the weights, and a gradual run resumes exactly;
- :func:`slimkit.save` writes the same keys, and loading replays the recorded pruning
  to rebuild the parametrization before reading the file.

:func:`make_permanent_` removes the masks and leaves plain weights with zeros; it is
recorded like a transform, so a model saved afterwards loads as a plain model.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from torch.nn.utils import parametrize

from slimkit.config import LayerSelector, SlimConfig
from slimkit.errors import ConfigError
from slimkit.layers import select_modules, select_names
from slimkit.registry import register

PRUNABLE = (nn.Linear, nn.Conv2d)


class WeightParametrization(nn.Module):
    """Base of slimkit's own weight parametrizations; :func:`make_permanent_` removes them."""


class PruneMask(WeightParametrization):
    """``weight = where(mask, original, 0)``: pruned entries are exactly +0.0."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask.detach().clone().bool())

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        # where(), not weight * mask: a product would leave -0.0 for negative weights,
        # which is not bit-identical to the +0.0 a decoded file gives back.
        return torch.where(self.mask, weight, weight.new_zeros(()))


class GradualSchedule(BaseModel):
    """The polynomial sparsity schedule of Zhu & Gupta (2017), "To prune, or not to prune".

    The sparsity rises from ``initial`` to ``final`` over ``[begin_step, end_step]``,
    fast at first and slowly at the end, with the mask updated every ``every`` steps::

        s(t) = final + (initial - final) * (1 - (t - begin_step) / (end_step - begin_step)) ** 3

    for the update steps ``t = begin_step, begin_step + every, ...`` and ``end_step``.
    Between updates the sparsity of the last update holds; before ``begin_step`` the
    model is dense, after ``end_step`` it stays at ``final``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    initial: float = Field(0.0, ge=0, lt=1)
    final: float = Field(gt=0, lt=1)
    begin_step: int = Field(0, ge=0)
    end_step: int = Field(ge=1)
    every: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> GradualSchedule:
        problems = []
        if self.end_step <= self.begin_step:
            problems.append(f"end_step ({self.end_step}) must be after begin_step ({self.begin_step})")
        if self.initial > self.final:
            problems.append(f"initial ({self.initial}) must not exceed final ({self.final})")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def is_update(self, step: int) -> bool:
        """Whether the mask is recomputed after optimizer step ``step``."""
        if step < self.begin_step or step > self.end_step:
            return False
        return (step - self.begin_step) % self.every == 0 or step == self.end_step

    def sparsity_at(self, step: int) -> float:
        """The target sparsity in force after optimizer step ``step``."""
        if step < self.begin_step:
            return 0.0
        if step >= self.end_step:
            return self.final
        t = self.begin_step + (step - self.begin_step) // self.every * self.every
        done = (t - self.begin_step) / (self.end_step - self.begin_step)
        return self.final + (self.initial - self.final) * (1.0 - done) ** 3


class MagnitudePruneConfig(SlimConfig):
    """Zero the weights of smallest magnitude in Linear and Conv2d layers.

    Attributes:
        sparsity: fraction of weights set to zero (one-shot unstructured pruning),
            rounded to the nearest whole number of weights.
        scope: ``per_layer`` gives every layer that sparsity; ``global`` ranks the
            magnitudes of all chosen layers together, so layers of small weights lose
            more of them.
        pattern: ``unstructured``, or ``n:m`` — at most ``n`` non-zero weights in each
            group of ``m`` consecutive inputs (2:4 runs on sparse tensor cores). Conv2d
            groups run along input channels at each kernel position.
        n: weights kept per group of ``m`` (``n:m`` only).
        m: group size (``n:m`` only).
        schedule: prune gradually while training (Zhu & Gupta) instead of at once; the
            target is ``schedule.final``. Drive it with :class:`GradualPruner`.
        layers: which Linear and Conv2d layers to prune.

    Pruned weights stay pruned: pruning a pruned layer again only adds zeros.
    """

    kind = "prune"
    method = "magnitude"
    sparsity: float | None = Field(None, ge=0, lt=1)
    scope: Literal["per_layer", "global"] = "per_layer"
    pattern: Literal["unstructured", "n:m"] = "unstructured"
    n: int = Field(2, ge=1)
    m: int = Field(4, ge=2)
    schedule: GradualSchedule | None = None
    layers: LayerSelector = Field(default_factory=LayerSelector)

    @model_validator(mode="after")
    def _fields_fit_the_pattern(self) -> MagnitudePruneConfig:
        problems = []
        if self.pattern == "unstructured":
            if (self.sparsity is None) == (self.schedule is None):
                problems.append("give exactly one of `sparsity` (one-shot) and `schedule` (gradual)")
            if (self.n, self.m) != (2, 4):
                problems.append("`n` and `m` apply to pattern 'n:m' only; remove them or set pattern: 'n:m'")
        else:
            if self.sparsity is not None or self.schedule is not None:
                problems.append("pattern 'n:m' fixes the sparsity at 1 - n/m; remove `sparsity` and `schedule`")
            if self.scope != "per_layer":
                problems.append("pattern 'n:m' is per group of weights; use scope: 'per_layer'")
            if self.n >= self.m:
                problems.append(f"n ({self.n}) must be smaller than m ({self.m}), e.g. n: 2, m: 4")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def start_sparsity(self) -> float:
        """The sparsity applied when the config is first applied (before any training)."""
        if self.pattern == "n:m":
            return 1.0 - self.n / self.m
        return self.sparsity if self.schedule is None else self.schedule.sparsity_at(0)


class MakePermanentConfig(SlimConfig):
    """Remove slimkit's masks and weight sharing, leaving plain weights (zeros stay zero).

    Recorded like any transform, so loading a saved model rebuilds the plain layers.
    """

    kind = "prune"
    method = "make_permanent"
    layers: LayerSelector = Field(default_factory=LayerSelector)


def weight_parametrization(module: nn.Module, name: str = "weight") -> WeightParametrization | None:
    """The slimkit parametrization of ``module.<name>``, if it has one."""
    if not parametrize.is_parametrized(module, name):
        return None
    found = [p for p in module.parametrizations[name] if isinstance(p, WeightParametrization)]
    return found[0] if found else None


def mask_of(module: nn.Module) -> torch.Tensor | None:
    """The boolean keep-mask of a pruned layer's weight (True = kept), or None."""
    p = weight_parametrization(module)
    return p.mask if isinstance(p, PruneMask) else None


def remove_parametrization(module: nn.Module) -> None:
    """Turn a masked or weight-shared ``module.weight`` back into a plain parameter."""
    p = weight_parametrization(module)
    if p is None:
        return
    # A mask keeps ``original`` (which becomes the weight again, requires_grad and all);
    # weight sharing keeps an empty, frozen one and remembers the weight's flag instead.
    requires_grad = getattr(p, "weight_requires_grad", None)
    parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    if requires_grad is not None:
        module.weight.requires_grad_(requires_grad)


def _keep_smallest_out(scores: list[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    """Masks (True = kept) zeroing the ``round(sparsity * total)`` smallest scores overall."""
    flat = torch.cat([s.reshape(-1) for s in scores])
    k = int(sparsity * flat.numel() + 0.5)
    keep = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
    # A stable sort breaks ties by position, so the same weights give the same mask.
    keep[torch.sort(flat, stable=True).indices[:k]] = False
    return [m.reshape(s.shape) for m, s in zip(keep.split([s.numel() for s in scores]), scores, strict=True)]


def _keep_n_of_m(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    # Conv2d [out, in, kh, kw]: groups run along input channels, as sparse tensor cores
    # read them, so move the input channels last before grouping.
    s = score.permute(0, 2, 3, 1) if score.dim() == 4 else score
    groups = s.reshape(-1, m)
    top = torch.sort(groups, dim=1, descending=True, stable=True).indices[:, :n]
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, top, True).reshape(s.shape)
    return keep.permute(0, 3, 1, 2) if score.dim() == 4 else keep


def _check_layers(model: nn.Module, names: list[str], config: MagnitudePruneConfig) -> None:
    problems = []
    for name in names:
        module = model.get_submodule(name)
        p = weight_parametrization(module)
        if p is not None and not isinstance(p, PruneMask):
            problems.append(f"{name}: its weights are shared (clustered); prune before clustering")
        if config.pattern == "n:m" and module.weight.shape[1] % config.m:
            problems.append(
                f"{name}: {module.weight.shape[1]} inputs do not split into groups of {config.m}; "
                f"leave it out with layers.ignore: [{name!r}]"
            )
    if problems:
        raise ConfigError(problems)


def prune_layers(model: nn.Module, names: list[str], config: MagnitudePruneConfig, sparsity: float) -> None:
    """Mask the smallest weights of layers ``names`` to ``sparsity`` (or the N:M pattern).

    Magnitudes are those of the weights in use (already masked ones count as zero), and
    a new mask is combined with the old one, so pruned weights are never revived.
    """
    modules = [model.get_submodule(n) for n in names]
    with torch.no_grad():
        scores = [m.weight.detach().abs().float() for m in modules]
        if config.pattern == "n:m":
            keeps = [_keep_n_of_m(s, config.n, config.m) for s in scores]
        elif config.scope == "global":
            keeps = _keep_smallest_out(scores, sparsity)
        else:
            keeps = [_keep_smallest_out([s], sparsity)[0] for s in scores]
        for module, keep in zip(modules, keeps, strict=True):
            old = mask_of(module)
            if old is None:
                parametrize.register_parametrization(module, "weight", PruneMask(keep))
            else:
                old &= keep


@register(MagnitudePruneConfig)
def _apply_magnitude(model: nn.Module, config: MagnitudePruneConfig, **_) -> list[str]:
    names = select_modules(model, config.layers, PRUNABLE)
    _check_layers(model, names, config)
    prune_layers(model, names, config, config.start_sparsity)
    return names


@register(MakePermanentConfig)
def _apply_make_permanent(model: nn.Module, config: MakePermanentConfig, **_) -> list[str]:
    names = [n for n, m in model.named_modules() if n and weight_parametrization(m) is not None]
    if not names:
        return []
    names = select_names(names, config.layers, "masked or weight-shared layer")
    for name in names:
        remove_parametrization(model.get_submodule(name))
    return names


def make_permanent_(model: nn.Module, layers: LayerSelector | None = None) -> list[str]:
    """Remove pruning masks and weight sharing from ``model``, leaving plain weights.

    Pruned weights stay exactly zero and shared weights keep their values; each layer's
    ``weight`` becomes a new ``nn.Parameter``, so create optimizers afterwards. The step
    is recorded with the model's transforms, so :func:`slimkit.save` then writes a plain
    model.

    Args:
        model: a model pruned by :class:`MagnitudePruneConfig` or clustered by
            :func:`slimkit.compress.cluster_`.
        layers: which of those layers; all of them by default.

    Returns:
        The qualified names of the layers made plain.
    """
    from slimkit.prune.api import prune_

    return prune_(model, MakePermanentConfig(layers=layers or LayerSelector())).layers


class GradualPruner:
    """Gradual magnitude pruning: raises a model's sparsity on schedule while it trains.

    Creating it prunes ``model`` to the schedule's starting sparsity with
    :func:`slimkit.prune.prune_` (recorded, so the model saves and loads); pass it as
    ``on_step`` to :func:`slimkit.distill.distill`, which calls it after every optimizer
    step. It keeps no state of its own: the masks live in the model, so a distillation
    resumed from a checkpoint continues the schedule exactly.

    Example:
        >>> cfg = MagnitudePruneConfig(schedule=GradualSchedule(final=0.9, end_step=800, every=100))
        >>> pruner = GradualPruner(model, cfg)
        >>> distill(None, model, data, train_cfg, on_step=pruner)
        >>> make_permanent_(model)
    """

    def __init__(self, model: nn.Module, config: MagnitudePruneConfig):
        if config.schedule is None:
            raise ConfigError("GradualPruner needs a config with a `schedule`; for one-shot pruning use prune_")
        from slimkit.prune.api import prune_

        self.config = config
        self.layers = prune_(model, config).layers

    def __call__(self, step: int, model: nn.Module) -> None:
        """Mask the smallest weights of the pruned layers up to the schedule's sparsity for
        ``step``, if the schedule updates after that step; otherwise do nothing. Weights
        masked before stay masked.

        Args:
            step: optimizer steps done so far, counted from 1 (as ``distill`` passes it).
            model: the model given when this pruner was created.
        """
        schedule = self.config.schedule
        if schedule.is_update(step):
            prune_layers(model, self.layers, self.config, schedule.sparsity_at(step))


def layer_sparsity(model: nn.Module, layers: list[str] | None = None) -> dict[str, float]:
    """Fraction of exactly-zero weights of each Linear/Conv2d layer (or of ``layers``)."""
    names = layers or [n for n, m in model.named_modules() if isinstance(m, PRUNABLE)]
    out = {}
    with torch.no_grad():
        for name in names:
            w = model.get_submodule(name).weight
            out[name] = float((w == 0).sum()) / w.numel()
    return out
