"""Dynamic int8 for Linear layers: int8 weights, activations quantized per call.

On CPU this runs PyTorch's fbgemm/x86 int8 GEMM. On other devices the same arithmetic is
emulated in floating point (correct, not fast): the recipe still runs everywhere.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn

from slimkit.config import LayerSelector, SlimConfig
from slimkit.layers import select_modules, set_module
from slimkit.quantize.dynamic_linear import DynamicInt8Linear
from slimkit.quantize.sensitivity import linear_sensitivity, most_sensitive
from slimkit.registry import register


class DynamicInt8Config(SlimConfig):
    """Dynamic int8 quantization of ``nn.Linear`` layers.

    Attributes:
        granularity: one weight scale per output channel (``per_channel``, more faithful,
            same speed) or one per layer (``per_tensor``, PyTorch's default).
        layers: which Linear layers; ``ignore`` keeps some in fp32 (a per-layer fallback).
        fallback_layers: also keep in fp32 the N chosen layers whose quantization moves
            the output most, measured on calibration data from the train split.
    """

    kind = "quantize"
    method = "dynamic_int8"
    granularity: Literal["per_channel", "per_tensor"] = "per_channel"
    layers: LayerSelector = Field(default_factory=LayerSelector)
    fallback_layers: int = Field(0, ge=0)


@register(DynamicInt8Config)
def _apply(model: nn.Module, config: DynamicInt8Config, calibration=None, **_) -> list[str]:
    names = select_modules(model, config.layers, (nn.Linear,))
    per_channel = config.granularity == "per_channel"
    if config.fallback_layers:
        scores = linear_sensitivity(model, names, calibration or [], per_channel)
        keep = set(most_sensitive(scores, config.fallback_layers))
        names = [n for n in names if n not in keep]
    for name in names:
        set_module(model, name, DynamicInt8Linear.from_linear(model.get_submodule(name), per_channel))
    return names
