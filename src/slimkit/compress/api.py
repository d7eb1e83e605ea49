"""The ``cluster_`` verb."""

from __future__ import annotations

from torch import nn

from slimkit.config import SlimConfig
from slimkit.errors import ConfigError
from slimkit.quantize.api import record_transform
from slimkit.registry import handler_for


def cluster_(model: nn.Module, config: SlimConfig, **context) -> list[str]:
    """Share weights in place as ``config`` says, and record it for :func:`slimkit.save`.

    Args:
        model: the ``nn.Module``; pruned layers keep their zeros.
        config: a clustering config, such as :class:`slimkit.compress.ClusterConfig`.
        **context: passed to the method.

    Returns:
        The qualified names of the clustered layers.

    Raises:
        ConfigError: ``config`` is not a clustering config, a layer is clustered already,
            or ``layer_bits`` keys match no chosen layer (every such key is listed).
        LayerSelectionError: a pattern in ``config.layers`` matches no layer.
    """
    if config.kind != "cluster":
        raise ConfigError(f"cluster_ takes a cluster config, not {type(config).__name__}")
    layers = handler_for(config)(model, config, **context)
    record_transform(model, config, layers)
    return layers
