"""The ``quantize_`` verb."""

from __future__ import annotations

from typing import Any

from slimkit.config import SlimConfig
from slimkit.errors import ConfigError
from slimkit.registry import handler_for
from slimkit.zoo.loaded import LoadedModel

TRANSFORMS_ATTR = "_slimkit_transforms"


def quantize_(model: Any, config: SlimConfig, **context: Any) -> list[str]:
    """Quantize ``model`` in place as ``config`` says.

    Args:
        model: an ``nn.Module`` for the PyTorch methods, a
            :class:`slimkit.deploy.OnnxModel` for the ONNX Runtime methods, or a
            :class:`slimkit.zoo.models.LoadedModel` for either PyTorch kind. Methods
            that rewrite the whole program (``pt2e_static_int8``) need the LoadedModel:
            its ``module`` is replaced.
        config: one of the configs in :mod:`slimkit.quantize`.
        **context: what some methods need, e.g. ``calibration`` (a list of input dicts
            drawn from the train split) for static quantization.

    Returns:
        The qualified names of the layers that were quantized.
    """
    if config.kind != "quantize":
        raise ConfigError(f"quantize_ takes a quantize config, not {type(config).__name__}")
    if getattr(config, "replaces_module", False):
        if not isinstance(model, LoadedModel):
            raise ConfigError(
                f"{config.method} replaces the whole module by a captured program, so give quantize_ the "
                "LoadedModel (slimkit.load_model(...)), not the nn.Module: its module is replaced"
            )
        history = transforms_of(model.module)
        layers, recorded = handler_for(config)(model, config, **context)
        object.__setattr__(model.module, TRANSFORMS_ATTR, history)
        record_transform(model.module, recorded, layers)
        return layers
    if isinstance(model, LoadedModel):
        model = model.module
    layers = handler_for(config)(model, config, **context)
    record_transform(model, config, layers)
    return layers


def record_transform(model: Any, config: SlimConfig, layers: list[str]) -> None:
    """Remember what was applied, so that a saved model can be rebuilt without pickle."""
    history = getattr(model, TRANSFORMS_ATTR, None)
    if history is None:
        history = []
        object.__setattr__(model, TRANSFORMS_ATTR, history)
    history.append({"config": config.to_dict(), "layers": list(layers)})


def transforms_of(model: Any) -> list[dict[str, Any]]:
    return list(getattr(model, TRANSFORMS_ATTR, []))
