"""Sensitivity analysis of a transformer encoder's heads and FFN neurons, layer by layer.

The transformer counterpart of :mod:`slimkit.prune.sensitivity`: each layer's attention
heads are one group and its FFN neurons another. :func:`transformer_sensitivity` prunes
one group at a time at rising ratios and evaluates the task metric,
:func:`transformer_costs` gives the exact parameter (or multiply-accumulate) count as a
function of what each group keeps, and the results have the same form as the CNN ones,
so :func:`slimkit.prune.sensitivity.ratios_for_budget` picks per-layer ratios for a
target size or speed and :func:`slimkit.report.sensitivity.sensitivity_plot` draws them.
:func:`config_for_budget` turns that choice into a :class:`TransformerPruneConfig`.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from slimkit.errors import ConfigError
from slimkit.modes import eval_mode
from slimkit.prune.heads import (
    GRADIENT_METHODS,
    EncoderLayer,
    LayerStructure,
    LossFn,
    TransformerPruneConfig,
    _calibration_batches,
    _keep_best,
    _remove_count,
    encoder_layers,
    gradient_scores,
    magnitude_scores,
    remove_heads_,
    remove_neurons_,
    sentence_embedding,
)
from slimkit.prune.sensitivity import DEFAULT_RATIOS, ratios_for_budget

PARTS = ("heads", "ffn")


def group_name(layer: int, part: str) -> str:
    """The key of one group: ``layer3.heads`` or ``layer3.ffn``."""
    return f"layer{layer}.{part}"


def transformer_sensitivity(
    model: nn.Module,
    evaluate: Callable[[nn.Module], float],
    ratios: Sequence[float] = DEFAULT_RATIOS,
    layers: Iterable[int] | None = None,
    parts: Sequence[Literal["heads", "ffn"]] = PARTS,
    *,
    importance: str = "l1",
    min_heads_per_layer: int = 1,
    higher_is_better: bool = True,
    calibration: Iterable[Mapping[str, Any]] | None = None,
    loss_fn: LossFn | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """The task metric as each layer's heads (or FFN neurons) alone are pruned at rising ratios.

    For every group and ratio, a copy of ``model`` loses that fraction of the group's
    least important heads or neurons (ranked once, on the whole model, by
    ``importance``) and ``evaluate`` scores it. The model itself is not changed. Evaluate
    on held-out training data, not the test split: the result chooses what to prune.

    Cost: ``len(groups) * len(ratios)`` evaluations at most (ratios that give the same
    count are evaluated once).

    Args:
        model: a BERT-like encoder, or a module holding one.
        evaluate: ``evaluate(model) -> float``, e.g. the cosine of the sentence
            embeddings to the unpruned model's on a few batches.
        ratios: fractions removed, each in ``(0, 1)``.
        layers: layer indices to analyse (default all).
        parts: ``heads``, ``ffn`` or both.
        importance: ``l1``, ``l2``, ``taylor`` or ``michel``, as in
            :class:`TransformerPruneConfig`.
        min_heads_per_layer: no layer keeps fewer heads.
        higher_is_better: whether a larger metric is better.
        calibration, loss_fn, seed: for ``taylor`` and ``michel``, as in
            :func:`slimkit.prune_`.

    Returns:
        ``{"baseline", "ratios", "higher_is_better", "importance", "round_to": 1,
        "min_channels", "groups": {"layer3.heads": {"size", "kept": [...], "metric":
        [...]}, ...}}``: the form of :func:`slimkit.prune.sensitivity.channel_sensitivity`.

    Raises:
        ConfigError: a ratio outside ``(0, 1)``, an unknown importance or part, a layer
            that does not exist, or missing calibration data for a gradient importance.
    """
    ratios = [float(r) for r in ratios]
    found = encoder_layers(model)
    chosen = list(range(len(found))) if layers is None else list(layers)
    problems = [f"ratios: {r} must be a fraction removed, in (0, 1)" for r in ratios if not 0 < r < 1]
    problems += [f"layers: {i} does not exist; the model has layers 0..{len(found) - 1}"
                 for i in chosen if not 0 <= i < len(found)]
    problems += [f"parts: {p!r} is not known; choose from {', '.join(PARTS)}" for p in parts if p not in PARTS]
    if importance not in ("l1", "l2", *GRADIENT_METHODS):
        problems.append(f"importance: {importance!r} is not known; choose one of l1, l2, {', '.join(GRADIENT_METHODS)}")
    if min_heads_per_layer < 1:
        problems.append(f"min_heads_per_layer: {min_heads_per_layer} must be at least 1")
    if problems:
        raise ConfigError(problems)
    scores = _scores(model, found, importance, calibration, loss_fn, seed)
    return _analyse(model, evaluate, ratios, chosen, parts, scores, importance, min_heads_per_layer, higher_is_better)


def _analyse(model: nn.Module, evaluate: Callable[[nn.Module], float], ratios: list[float], chosen: list[int],
             parts: Sequence[str], scores: Mapping[str, list[torch.Tensor]], importance: str,
             min_heads_per_layer: int, higher_is_better: bool) -> dict[str, Any]:
    """:func:`transformer_sensitivity` once its arguments are checked and the heads and
    neurons are ranked (``scores``, as :func:`_scores` gives them)."""
    found = encoder_layers(model)
    baseline = float(evaluate(model))
    result: dict[str, Any] = {
        "baseline": baseline, "ratios": ratios, "higher_is_better": higher_is_better,
        "importance": importance, "round_to": 1, "min_channels": min_heads_per_layer, "groups": {},
    }
    for i, part in itertools.product(chosen, parts):
        size = found[i].num_heads if part == "heads" else found[i].width
        floor = min(min_heads_per_layer if part == "heads" else 1, size)
        kept, metric, seen = [], [], {size: baseline}
        for r in ratios:
            n = max(size - _remove_count(r, size), floor)
            if n not in seen:
                trial = copy.deepcopy(model)
                target = encoder_layers(trial)[i]
                keep = _keep_best(scores[part][i], n)
                (remove_heads_ if part == "heads" else remove_neurons_)(target, keep)
                seen[n] = float(evaluate(trial))
                del trial
            kept.append(n)
            metric.append(seen[n])
        result["groups"][group_name(i, part)] = {"size": size, "kept": kept, "metric": metric}
    return result


def _scores(model: nn.Module, layers: list[EncoderLayer], importance: str, calibration, loss_fn,
            seed: int, calibration_batches: int = 32) -> dict[str, list[torch.Tensor]]:
    if importance in GRADIENT_METHODS:
        config = TransformerPruneConfig(importance=importance, seed=seed, calibration_batches=calibration_batches)
        batches = _calibration_batches(model, calibration, config)
        heads, neurons = gradient_scores(model, layers, importance, batches, loss_fn, None, seed)
    else:
        heads, neurons = magnitude_scores(layers, importance)
    return {"heads": heads, "ffn": neurons}


def transformer_costs(model: nn.Module, kind: Literal["params", "macs"] = "params", seq_len: int = 128) -> dict[str, Any]:
    """The encoder's parameter (or MAC) count as an exact function of what each layer keeps.

    One head costs its query, key and value rows (with biases) and its columns of the
    attention output projection; one FFN neuron its intermediate row (with bias) and its
    output column. ``params`` counts every parameter of ``model`` (the rest is a
    constant). ``macs`` counts, per example of ``seq_len`` tokens, the multiply-
    accumulates of the encoder layers' projections and of the attention products
    (``Q K^T`` and the weighted sum of values, ``2 * seq_len^2 * head_size`` per head);
    embeddings, layer norms and the pooler are comparatively free and left out.

    Returns:
        The form of :func:`slimkit.prune.sensitivity.channel_costs`: ``{"kind",
        "total", "sizes": {group: count}, "terms": [{"coef", "groups"}]}``.
    """
    if kind not in ("params", "macs"):
        raise ConfigError(f"kind: {kind!r} is not known; choose params or macs")
    if seq_len < 1:
        raise ConfigError(f"seq_len: {seq_len} must be at least 1")
    layers = encoder_layers(model)
    sizes, terms, grouped = {}, [], 0
    for i, x in enumerate(layers):
        d = x.head_size
        qkv = [x.query, x.key, x.value]
        if kind == "params":
            per_head = sum(lin.in_features * d + (d if lin.bias is not None else 0) for lin in qkv)
            per_head += x.attn_out.out_features * d
            per_neuron = x.up.in_features + (1 if x.up.bias is not None else 0) + x.down.out_features
        else:
            per_head = seq_len * (sum(lin.in_features for lin in qkv) * d + x.attn_out.out_features * d)
            per_head += 2 * seq_len * seq_len * d
            per_neuron = seq_len * (x.up.in_features + x.down.out_features)
        sizes[group_name(i, "heads")], sizes[group_name(i, "ffn")] = x.num_heads, x.width
        terms += [{"coef": per_head, "groups": [group_name(i, "heads")]},
                  {"coef": per_neuron, "groups": [group_name(i, "ffn")]}]
        grouped += per_head * x.num_heads + per_neuron * x.width
    if kind == "params":
        rest = sum(p.numel() for p in model.parameters()) - grouped
        if rest:
            terms.append({"coef": rest, "groups": []})
    total = sum(t["coef"] * (sizes[t["groups"][0]] if t["groups"] else 1) for t in terms)
    return {"kind": kind, "total": int(total), "sizes": sizes, "terms": terms}


def config_for_budget(choice: Mapping[str, Any], importance: str = "l1", **fields: Any) -> TransformerPruneConfig:
    """The :class:`TransformerPruneConfig` that prunes what
    :func:`slimkit.prune.sensitivity.ratios_for_budget` chose: each changed layer keeps
    that many heads and neurons, the most important by ``importance``.

    Other config fields (``calibration_batches``, ``seed``, ...) pass through ``fields``.
    """
    return TransformerPruneConfig(importance=importance, kept=_kept(choice), **fields)


def _kept(choice: Mapping[str, Any], scores: Mapping[str, list[torch.Tensor]] | None = None
          ) -> dict[int, LayerStructure]:
    """Per layer, how many heads and neurons a budget choice keeps (groups it does not
    prune stay whole); with ``scores``, which ones: the best of each group."""
    kept: dict[int, dict[str, int | list[int]]] = {}
    for key in choice["ratios"]:
        layer, part = _parse(key)
        n = int(choice["kept"][key])
        kept.setdefault(layer, {})[part] = n if scores is None else _keep_best(scores[part][layer], n)
    return {i: LayerStructure(**v) for i, v in kept.items()}


def _parse(key: str) -> tuple[int, str]:
    layer, _, part = key.partition(".")
    if not layer.startswith("layer") or not layer[5:].isdigit() or part not in PARTS:
        raise ConfigError(f"{key!r} is not a transformer group key like 'layer3.heads' or 'layer3.ffn'")
    return int(layer[5:]), part


def embedding_cosine(model: nn.Module, batches: Sequence[Mapping[str, torch.Tensor]]) -> Callable[[nn.Module], float]:
    """``evaluate(m)``: the mean cosine of ``m``'s sentence embeddings to ``model``'s (as it
    is now) on ``batches``, in eval mode: a label-free metric for a sensitivity analysis."""
    def embed(m: nn.Module) -> list[torch.Tensor]:
        with eval_mode(m), torch.no_grad():
            return [sentence_embedding(m(**b), b).float() for b in batches]

    reference = embed(model)

    def evaluate(m: nn.Module) -> float:
        sims = [torch.nn.functional.cosine_similarity(e, r, dim=-1) for e, r in zip(embed(m), reference, strict=True)]
        return float(torch.cat(sims).mean())

    return evaluate


def kept_for_budget(model: nn.Module, config: TransformerPruneConfig, calibration, loss_fn: LossFn | None
                    ) -> tuple[dict[int, LayerStructure], dict[str, Any]]:
    """What each layer keeps to meet ``config.budget``, and the analysis that chose it.

    Used by :func:`slimkit.prune_` for a :class:`TransformerPruneConfig` with a budget.
    """
    budget = config.budget
    if calibration is None:
        raise ConfigError("a pruning budget needs calibration data: the sensitivity analysis scores each pruned "
                          "copy by the cosine of its sentence embeddings to the unpruned model's; pass "
                          "calibration=[input dicts, ...] to prune_ (a recipe passes train sentences)")
    calibration = list(calibration)
    batches = _calibration_batches(model, calibration, config.model_copy(update={"calibration_batches": budget.batches}))
    layers = encoder_layers(model)
    # Ranked once: the analysis and the final choice keep the same heads and neurons, and
    # gradient importances (a backward pass per calibration batch) are not computed twice.
    scores = _scores(model, layers, config.importance, calibration, loss_fn, config.seed, config.calibration_batches)
    sens = _analyse(model, embedding_cosine(model, batches), [float(r) for r in budget.ratios], list(range(len(layers))),
                    PARTS, scores, config.importance, config.min_heads_per_layer, True)
    costs = transformer_costs(model, budget.cost, budget.seq_len)
    choice = ratios_for_budget(sens, costs, budget.keep)
    return _kept(choice, scores), {"kind": "sensitivity", "metric": "embedding cosine to the unpruned model (calibration data)",
                       "sensitivity": sens, "choice": choice}
