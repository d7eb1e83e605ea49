"""Dynamic int8 for Linear layers: int8 weights, activations quantized per call.

On CPU this runs PyTorch's fbgemm/x86 int8 GEMM. On other devices the same arithmetic is
emulated in floating point (correct, not fast): the recipe still runs everywhere.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from slimkit.config import LayerSelector, SlimConfig
from slimkit.layers import select_modules, set_module
from slimkit.quantize.int8_linear import Int8WeightLinear
from slimkit.quantize.qparams import dequantize_int8
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


class DynamicInt8Linear(Int8WeightLinear):
    """A Linear layer with int8 weights whose inputs are quantized on the fly."""

    def __init__(self, in_features: int, out_features: int, bias: bool, per_channel: bool = True):
        super().__init__(in_features, out_features, bias, per_channel)
        self._packed = None
        # Packed fbgemm params are derived from the buffers; drop them when they change.
        self.register_load_state_dict_post_hook(lambda m, _: setattr(m, "_packed", None))

    def _pack(self):
        s = self.weight_scale
        with warnings.catch_warnings():
            # PyTorch flags its quantized-tensor constructors as deprecated; they are still
            # the only way to reach its int8 CPU GEMM without extra dependencies.
            warnings.simplefilter("ignore", UserWarning)
            if s.numel() > 1:
                qw = torch._make_per_channel_quantized_tensor(
                    self.weight_int8, s.double(), torch.zeros_like(s, dtype=torch.long), 0
                )
            else:
                qw = torch._make_per_tensor_quantized_tensor(self.weight_int8, float(s), 0)
            return torch.ops.quantized.linear_prepack(qw, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.dtype == torch.float32:
            if self._packed is None:
                self._packed = self._pack()
            # fbgemm quantizes activations to 7 bits (reduce_range) to avoid overflow in
            # its int16 accumulation on CPUs without VNNI.
            return torch.ops.quantized.linear_dynamic(x, self._packed, True)
        return _emulated_dynamic_linear(x, self.weight_int8, self.weight_scale, self.bias)

    def extra_repr(self) -> str:
        per = "per_channel" if self.weight_scale.numel() > 1 else "per_tensor"
        return f"in_features={self.in_features}, out_features={self.out_features}, {per}"


def _emulated_dynamic_linear(x, q, scale, bias):
    # The same 7-bit activation range as the CPU kernel, so that a recipe gives the same
    # numbers on every device.
    levels = 127.0
    lo = x.detach().amin().clamp(max=0)
    hi = x.detach().amax().clamp(min=0)
    s = ((hi - lo) / levels).clamp(min=1e-12)
    zp = torch.round(-lo / s)
    xq = (torch.round(x / s + zp).clamp(0, levels) - zp) * s
    return F.linear(xq, dequantize_int8(q, scale).to(x.dtype), None if bias is None else bias.to(x.dtype))


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
