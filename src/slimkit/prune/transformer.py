"""The ``transformer_structured`` method: attention heads and FFN neurons removed from a
BERT-family encoder, by fractions or to a budget chosen by sensitivity.

Scoring and removal live in :mod:`slimkit.prune.heads`, the budget's search in
:mod:`slimkit.prune.transformer_sensitivity`; this module puts them together.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

from slimkit.prune.api import Pruned
from slimkit.prune.heads import (
    LayerStructure,
    LossFn,
    TransformerPruneConfig,
    _plan,
    encoder_layers,
    remove_heads_,
    remove_neurons_,
)
from slimkit.prune.transformer_sensitivity import kept_for_budget
from slimkit.registry import register


@register(TransformerPruneConfig)
def prune_transformer_(model: nn.Module, config: TransformerPruneConfig, calibration: Iterable[Mapping[str, Any]] | None = None,
                 loss_fn: LossFn | None = None, reference: nn.Module | None = None,
                 **_: Any) -> Pruned:
    """Remove attention heads and FFN neurons from ``model`` in place; use :func:`slimkit.prune_`.

    Args:
        model: a BERT-like encoder, or a module holding one (a
            :class:`~slimkit.zoo.models.TextEncoder`).
        config: what to remove and how to rank.
        calibration: input dicts (numpy arrays or tensors) the model is called with, for
            ``taylor`` and ``michel``; the first ``config.calibration_batches`` are used.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor`` for ``taylor`` and ``michel``;
            without it, a label-free loss: the cosine distance of the sentence embedding
            to the reference's, nudged (see :func:`gradient_scores`).
        reference: the unpruned model for that loss when ``model`` has been pruned
            before; by default ``model`` as it is now.

    Returns:
        The layers changed, and the config with ``kept`` filled in for every one of them.

    Raises:
        ConfigError: the model is not BERT-like, ``kept`` or per-layer fractions name
            layers or indices the model does not have, or calibration data is missing.
    """
    analysis = None
    if config.budget is not None and config.kept is None:
        kept, analysis = kept_for_budget(model, config, calibration, loss_fn)
        config = config.model_copy(update={"kept": kept})
    layers = encoder_layers(model)
    plan_heads, plan_ffn = _plan(model, layers, config, calibration, loss_fn, reference)
    changed: dict[int, LayerStructure] = {}
    for i, x in enumerate(layers):
        h = plan_heads[i] if plan_heads[i] != list(range(x.num_heads)) else None
        n = plan_ffn[i] if plan_ffn[i] != list(range(x.width)) else None
        if h is not None:
            remove_heads_(x, h)
        if n is not None:
            remove_neurons_(x, n)
        if h is not None or n is not None:
            # Head indices are few and tell which heads survived; neuron indices are
            # thousands, and loading only needs their number.
            changed[i] = LayerStructure(heads=h, ffn=None if n is None else len(n))
    return Pruned([layers[i].name for i in changed], config.model_copy(update={"kept": changed}), analysis)
