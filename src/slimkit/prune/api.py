"""The ``prune_`` verb."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from slimkit.config import SlimConfig
from slimkit.errors import ConfigError
from slimkit.quantize.api import record_transform
from slimkit.registry import handler_for


@dataclass(frozen=True)
class Pruned:
    """What a pruning method did.

    Attributes:
        layers: qualified names of the layers it changed.
        config: the config as recorded with the model. Methods that choose from data
            (which heads, which neurons) fill the choice in, so that loading the saved
            model rebuilds the same shapes without choosing again.
        analysis: what a method measured to choose, when it did (the sensitivity curves
            and the per-group choice of a budget), for the run report.
    """

    layers: list[str]
    config: SlimConfig
    analysis: dict[str, Any] | None = None


def prune_(model: Any, config: SlimConfig, **context: Any) -> Pruned:
    """Prune ``model`` in place as ``config`` says, and record it for :func:`slimkit.save`.

    Args:
        model: the ``nn.Module`` to prune.
        config: a pruning config, such as
            :class:`slimkit.prune.TransformerPruneConfig`.
        **context: what some methods need, e.g. ``calibration`` (an iterable of input
            dicts) for importance scores computed from gradients.

    Returns:
        The changed layers and the config as recorded (with data-dependent choices
        filled in).

    Raises:
        ConfigError: ``config`` is not a pruning config, or the model does not fit it.
    """
    if config.kind != "prune":
        raise ConfigError(f"prune_ takes a prune config, not {type(config).__name__}")
    # A handler returns the changed layers, or a Pruned when what it chose from data
    # must be recorded in the config for loading to replay.
    result = handler_for(config)(model, config, **context)
    if not isinstance(result, Pruned):
        result = Pruned(list(result), config)
    record_transform(model, result.config, result.layers)
    return result
