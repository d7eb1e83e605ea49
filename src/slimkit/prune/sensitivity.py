"""Sensitivity analysis of channel groups, and per-group ratios chosen for a budget.

Layers differ in how much pruning they tolerate: a stage that carries the classifier's
features may lose half its channels for a point of accuracy, while a narrow stem loses
ten points. :func:`channel_sensitivity` measures this: it prunes one group at a time, at
rising ratios, and evaluates the task metric. :func:`channel_costs` says how many
parameters (or multiply-accumulates) each choice of channel counts leaves, exactly, and
:func:`ratios_for_budget` uses both to pick per-group ratios that meet a size or speed
target while losing the least metric.

Everything returned is plain JSON-ready data, for reports and recipes.
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from slimkit.errors import ConfigError
from slimkit.modes import eval_mode
from slimkit.prune.channel_counts import group_key, kept_channels, prunable_groups, top_channels
from slimkit.prune.channels import CONV_TYPES, NORM_TYPES, ChannelGroup, channel_groups, shrink_
from slimkit.prune.importance import (
    IMPORTANCE_METHODS,
    LossFn,
    channel_importance,
    taylor_importance,
)

DEFAULT_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def channel_sensitivity(
    model: nn.Module,
    example_input: torch.Tensor | tuple,
    evaluate: Callable[[nn.Module], float],
    ratios: Sequence[float] = DEFAULT_RATIOS,
    groups: Iterable[str] | None = None,
    *,
    importance: str = "l1",
    round_to: int = 1,
    min_channels: int = 1,
    exclude: Iterable[str] = (),
    higher_is_better: bool = True,
    calibration: Iterable[Any] | None = None,
    loss_fn: LossFn | None = None,
) -> dict[str, Any]:
    """The task metric as each channel group alone is pruned at rising ratios.

    For every group and ratio, a copy of ``model`` loses that ratio of the group's least
    important channels (the rest of the model stays whole) and ``evaluate`` scores it.
    The model itself is not changed. Evaluate on held-out data that is not the test
    split, since the result is used to choose what to prune.

    Cost: ``len(groups) * len(ratios)`` evaluations at most (ratios that give the same
    channel count are evaluated once), so keep ``evaluate`` to a few batches.

    Args:
        model: the model to analyse.
        example_input: an input the model accepts, for tracing.
        evaluate: ``evaluate(model) -> float``, the task metric (accuracy, or a loss with
            ``higher_is_better=False``).
        ratios: fractions of channels removed, each in ``(0, 1)``.
        groups: keys of the groups to analyse (see :func:`slimkit.prune.channel_counts.group_key`),
            or None for every prunable group.
        importance: ``l1``, ``l2`` or ``taylor``: which channels go first.
        round_to: kept channel counts are multiples of this (as in ``ChannelPruneConfig``).
        min_channels: no group keeps fewer channels.
        exclude: modules left whole and not traced, as in ``channel_groups``.
        higher_is_better: whether a larger metric is better.
        calibration: batches for ``taylor``.
        loss_fn: loss for ``taylor``.

    Returns:
        ``{"baseline": metric of the whole model, "ratios": [...], "higher_is_better",
        "importance", "round_to", "min_channels", "groups": {key: {"size": channels,
        "kept": [channels kept at each ratio], "metric": [metric at each ratio]}}}``, the
        groups in graph order.

    Raises:
        ConfigError: a ratio outside ``(0, 1)``, an unknown importance, or a key in
            ``groups`` that names no prunable group.
    """
    ratios = [float(r) for r in ratios]
    problems = [f"ratios: {r} must be a fraction of channels removed, in (0, 1)" for r in ratios if not 0 < r < 1]
    if importance not in IMPORTANCE_METHODS:
        problems.append(f"importance: {importance!r} is not known; choose one of {', '.join(IMPORTANCE_METHODS)}")
    if round_to < 1 or min_channels < 1:
        problems.append(f"round_to ({round_to}) and min_channels ({min_channels}) must be at least 1")
    if problems:
        raise ConfigError(problems)
    found = prunable_groups(channel_groups(model, example_input, exclude))
    chosen = _choose(found, groups)
    if importance == "taylor":
        scores = dict(zip(chosen, taylor_importance(model, chosen, calibration, loss_fn), strict=True))
    else:
        scores = {g: channel_importance(model, g, importance) for g in chosen}
    baseline = float(evaluate(model))
    result: dict[str, Any] = {
        "baseline": baseline, "ratios": ratios, "higher_is_better": higher_is_better,
        "importance": importance, "round_to": round_to, "min_channels": min_channels, "groups": {},
    }
    for g in chosen:
        kept, metric, seen = [], [], {g.size: baseline}
        for r in ratios:
            n = kept_channels(g.size, r, round_to, min_channels)
            if n not in seen:
                trial = copy.deepcopy(model)
                shrink_(trial, {g: top_channels(scores[g], n)})
                seen[n] = float(evaluate(trial))
                del trial
            kept.append(n)
            metric.append(seen[n])
        result["groups"][group_key(g)] = {"size": g.size, "kept": kept, "metric": metric}
    return result


def _choose(found: list[ChannelGroup], keys: Iterable[str] | None) -> list[ChannelGroup]:
    if keys is None:
        return found
    by_key = {group_key(g): g for g in found}
    by_producer = {m.module: g for g in found for m in g.producers}
    missing = [k for k in keys if k not in by_producer]
    if missing:
        sample = ", ".join(list(by_key)[:6]) + (", ..." if len(by_key) > 6 else "")
        raise ConfigError([f"groups: {k!r} produces no prunable channel group; they are named like: {sample}" for k in missing])
    wanted = {id(by_producer[k]) for k in keys}
    return [g for g in found if id(g) in wanted]


# -- exact costs ---------------------------------------------------------------------------

def channel_costs(
    model: nn.Module,
    example_input: torch.Tensor | tuple,
    kind: Literal["params", "macs"] = "params",
    exclude: Iterable[str] = (),
) -> dict[str, Any]:
    """The model's parameter (or MAC) count as an exact function of each group's channels.

    Pruning two groups that meet in one convolution (its outputs and its inputs) removes
    fewer weights than the two alone would, so the count is not a sum over groups: it is
    a polynomial of degree two in the kept channel counts. This returns that polynomial;
    :func:`cost_of` evaluates it.

    ``params`` counts every parameter of the model. ``macs`` counts the multiply-accumulates
    of its convolutions and Linear layers per example, at ``example_input``'s size
    (other operations are comparatively free).

    Args:
        model: the model.
        example_input: an input the model accepts (its batch size does not matter).
        kind: ``params`` or ``macs``.
        exclude: as in ``channel_groups``; use the same as for pruning.

    Returns:
        ``{"kind", "total": the count of the whole model, "sizes": {key: channels},
        "terms": [{"coef": int, "groups": [key, ...]}, ...]}``: the count is the sum of
        ``coef`` times the product of the named groups' kept channels (no groups: a
        constant).
    """
    if kind not in ("params", "macs"):
        raise ConfigError(f"kind: {kind!r} is not known; choose params or macs")
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    groups = prunable_groups(channel_groups(model, inputs, exclude))
    dims: dict[tuple[str, int], dict[str | None, int]] = {}
    for g in groups:
        for m in g.members:
            form = dims.setdefault((m.module, m.dim), {None: m.extent})
            form[None] -= g.size * m.block
            form[group_key(g)] = form.get(group_key(g), 0) + m.block
    calls = _output_shapes(model, inputs) if kind == "macs" else {}
    poly: dict[tuple[str, ...], int] = defaultdict(int)
    modelled = 0
    for name, module in model.named_modules():
        if not (isinstance(module, (*CONV_TYPES, nn.Linear)) or (isinstance(module, NORM_TYPES) and module.affine)):
            continue
        out = dims.get((name, 0), {None: _size(module, 0)})
        if isinstance(module, NORM_TYPES):
            if kind == "params":
                _add(poly, _scale(out, 2))
                modelled += 2 * module.num_features
            continue
        weight = module.weight
        per_out = weight[0].numel() if weight.dim() > 1 else 1
        if isinstance(module, CONV_TYPES) and module.groups > 1:
            # A depthwise convolution's filters follow its outputs; a grouped one is fixed.
            w = _scale(out, per_out) if module.groups == module.out_channels else {None: weight.numel()}
        else:
            inn = dims.get((name, 1), {None: _size(module, 1)})
            w = _product(_scale(out, per_out // _size(module, 1)), inn)
        if kind == "params":
            _add(poly, w)
            modelled += weight.numel()
            if module.bias is not None:
                _add(poly, out)
                modelled += module.bias.numel()
        else:
            for shape in calls.get(name, []):
                positions = math.prod(shape) // (shape[0] * shape[-1 if isinstance(module, nn.Linear) else 1])
                _add(poly, _scale(w, positions))
    if kind == "params":
        poly[()] += sum(p.numel() for p in model.parameters()) - modelled
    terms = [{"coef": int(c), "groups": list(k)} for k, c in poly.items() if c]
    sizes = {group_key(g): g.size for g in groups}
    costs = {"kind": kind, "total": 0, "sizes": sizes, "terms": terms}
    costs["total"] = cost_of(costs, {})
    return costs


def cost_of(costs: Mapping[str, Any], kept: Mapping[str, int]) -> int:
    """The parameter (or MAC) count when each group keeps ``kept[key]`` channels (default all)."""
    sizes = costs["sizes"]
    total = 0
    for t in costs["terms"]:
        total += t["coef"] * math.prod(kept.get(k, sizes[k]) for k in t["groups"])
    return int(total)


def _size(module: nn.Module, dim: int) -> int:
    if isinstance(module, NORM_TYPES):
        return module.num_features
    if isinstance(module, nn.Linear):
        return module.out_features if dim == 0 else module.in_features
    return module.out_channels if dim == 0 else module.in_channels


def _scale(form: Mapping[Any, int], k: int) -> dict[Any, int]:
    return {key: c * k for key, c in form.items()}


def _product(a: Mapping[str | None, int], b: Mapping[str | None, int]) -> dict[tuple[str, ...], int]:
    out: dict[tuple[str, ...], int] = defaultdict(int)
    for ka, ca in a.items():
        for kb, cb in b.items():
            out[tuple(sorted(k for k in (ka, kb) if k is not None))] += ca * cb
    return out


def _add(poly: dict[tuple[str, ...], int], form: Mapping[Any, int]) -> None:
    for key, c in form.items():
        if not isinstance(key, tuple):
            key = () if key is None else (key,)
        poly[key] += c


def _output_shapes(model: nn.Module, inputs: tuple) -> dict[str, list[tuple[int, ...]]]:
    shapes: dict[str, list[tuple[int, ...]]] = defaultdict(list)
    hooks = [
        m.register_forward_hook(lambda _m, _i, out, name=name: shapes[name].append(tuple(out.shape)))
        for name, m in model.named_modules() if isinstance(m, (*CONV_TYPES, nn.Linear))
    ]
    try:
        with eval_mode(model), torch.no_grad():
            model(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return shapes


# -- choosing ratios -----------------------------------------------------------------------

def ratios_for_budget(sensitivity: Mapping[str, Any], costs: Mapping[str, Any], target: float) -> dict[str, Any]:
    """Per-group ratios that keep at most ``target`` of the cost, losing the least metric.

    Greedy: starting from the whole model, repeatedly move the group whose next measured
    ratio costs the least metric per parameter (or MAC) removed, until the cost is within
    budget. The last move usually overshoots, so channels are then given back (``round_to``
    at a time, where they recover the most metric per unit of cost) until none fits: no
    pruned group could keep one more step of channels without exceeding the budget.
    Between measured ratios the metric loss is interpolated linearly.

    Args:
        sensitivity: from :func:`channel_sensitivity`.
        costs: from :func:`channel_costs` on the same model (same ``exclude``).
        target: the fraction of the cost to keep, in ``(0, 1]``; e.g. 0.6 keeps at most
            60% of the parameters.

    Returns:
        ``{"ratios": {key: ratio}`` (groups left whole omitted; give it to
        ``ChannelPruneConfig(ratio=..., round_to=..., min_channels=...)`` with the
        sensitivity's ``round_to``, ``min_channels`` and ``importance``),
        ``"kept": {key: channels}``, ``"cost"``: the exact count after pruning,
        ``"budget"``: ``target * total``, ``"total"``, ``"kind"``, ``"metric_loss"``: the
        estimated loss, the sum of the measured single-group losses}``.

    Raises:
        ConfigError: ``target`` outside ``(0, 1]``, or a budget the measured ratios cannot
            reach (the message gives the smallest reachable fraction).
    """
    if not 0 < target <= 1:
        raise ConfigError(f"target: {target} must be the fraction of the cost to keep, in (0, 1]")
    sign = 1.0 if sensitivity["higher_is_better"] else -1.0
    base, step = sensitivity["baseline"], sensitivity["round_to"]
    ladders: dict[str, list[tuple[int, float]]] = {}
    for key, g in sensitivity["groups"].items():
        if key not in costs["sizes"] or costs["sizes"][key] != g["size"]:
            raise ConfigError(f"costs: group {key!r} is not in the costs; compute both on the same model and exclude")
        rungs = {g["size"]: 0.0}
        for n, m in zip(g["kept"], g["metric"], strict=True):
            rungs[n] = sign * (base - m)
        ladders[key] = sorted(rungs.items(), reverse=True)
    budget = target * costs["total"]
    kept = {k: lad[0][0] for k, lad in ladders.items()}
    at = dict.fromkeys(ladders, 0)
    cost = cost_of(costs, kept)
    while cost > budget:
        best = None
        for k, lad in ladders.items():
            if at[k] + 1 >= len(lad):
                continue
            saved = cost - cost_of(costs, {**kept, k: lad[at[k] + 1][0]})
            if saved <= 0:
                continue
            loss = max(lad[at[k] + 1][1] - lad[at[k]][1], 0.0)
            # Equal losses per unit (often none at all): take the bigger saving first.
            if best is None or (loss / saved, -saved) < best[:2]:
                best = (loss / saved, -saved, k)
        if best is None:
            raise ConfigError(
                f"target: {target} cannot be met by the measured ratios; the most they remove leaves "
                f"{cost / costs['total']:.3f} of the {costs['kind']}; measure larger ratios or more groups"
            )
        k = best[2]
        at[k] += 1
        kept[k] = ladders[k][at[k]][0]
        cost = cost_of(costs, kept)
    # The last move usually overshoots: give channels back, one step at a time, where they
    # buy the most metric per unit of cost, while the budget still holds.
    sizes = costs["sizes"]
    while True:
        best = None
        for k, n in kept.items():
            more = min(n + step, sizes[k])
            if more == n:
                continue
            added = cost_of(costs, {**kept, k: more}) - cost
            if cost + added > budget:
                continue
            gain = _loss_at(ladders[k], n) - _loss_at(ladders[k], more)
            if best is None or (gain / max(added, 1), -added) > best[:2]:
                best = (gain / max(added, 1), -added, k, more)
        if best is None:
            break
        kept[best[2]] = best[3]
        cost = cost_of(costs, kept)
    return {
        "ratios": {k: (sizes[k] - n) / sizes[k] for k, n in kept.items() if n < sizes[k]},
        "kept": kept,
        "cost": cost,
        "budget": budget,
        "total": costs["total"],
        "kind": costs["kind"],
        "metric_loss": sum(_loss_at(ladders[k], n) for k, n in kept.items()),
    }


def _loss_at(ladder: list[tuple[int, float]], n: int) -> float:
    """The measured loss at ``n`` channels, interpolated linearly between rungs."""
    for (hi, lhi), (lo, llo) in zip(ladder, ladder[1:], strict=False):
        if lo <= n <= hi:
            return lhi + (llo - lhi) * (hi - n) / (hi - lo)
    return ladder[-1][1]
