"""Quantization-aware training: train through the int8 rounding, then convert.

``quantize_(model, QATConfig())`` swaps Linear layers for :class:`FakeQuantLinear`, which
computes in floating point exactly what the deployed int8 kernel will: per-channel
symmetric int8 weights, and activations quantized per call over their observed range
(dynamic quantization, as both PyTorch's and ONNX Runtime's dynamic int8 do). Rounding
passes gradients straight through. Train with :func:`slimkit.distill.distill`, the fp32
model as teacher, then :func:`convert_qat_` for the target runtime.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from slimkit.config import LayerSelector, SlimConfig
from slimkit.layers import select_modules, set_module
from slimkit.registry import register

# Activation levels per runtime: PyTorch's x86 kernel uses 7 bits (reduce_range), ONNX
# Runtime's DynamicQuantizeLinear the full 8.
LEVELS = {"torch": 127.0, "onnxruntime": 255.0}


class QATConfig(SlimConfig):
    """Prepare Linear layers for quantization-aware training.

    Attributes:
        target: the runtime whose int8 arithmetic is simulated (its activation levels).
        layers: which Linear layers.
    """

    kind = "quantize"
    method = "qat_int8"
    target: Literal["onnxruntime", "torch"] = "onnxruntime"
    layers: LayerSelector = Field(default_factory=LayerSelector)


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    # Round forward, identity backward (the straight-through estimator).
    return x + (torch.round(x) - x).detach()


def fake_quant_weight(w: torch.Tensor) -> torch.Tensor:
    """Per-output-channel symmetric int8, as :func:`slimkit.quantize.qparams.symmetric_int8`."""
    scale = (w.detach().abs().amax(dim=1, keepdim=True) / 127.0).clamp(min=1e-12)
    return torch.clamp(_round_ste(w / scale), -127, 127) * scale


def fake_quant_dynamic(x: torch.Tensor, levels: float) -> torch.Tensor:
    """Asymmetric per-tensor quantization over the range of ``x`` (always including 0)."""
    lo = x.detach().amin().clamp(max=0)
    hi = x.detach().amax().clamp(min=0)
    scale = ((hi - lo) / levels).clamp(min=1e-12)
    zero = torch.round(-lo / scale)
    q = torch.clamp(_round_ste(x / scale) + zero, 0, levels)
    return (q - zero) * scale


class FakeQuantLinear(nn.Linear):
    """A Linear that computes as its int8 deployment will; its parameters keep their names."""

    levels: float = LEVELS["onnxruntime"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(fake_quant_dynamic(x, self.levels), fake_quant_weight(self.weight), self.bias)


@register(QATConfig)
def _prepare(model: nn.Module, config: QATConfig, **_) -> list[str]:
    names = select_modules(model, config.layers, (nn.Linear,))
    for name in names:
        old = model.get_submodule(name)
        if isinstance(old, FakeQuantLinear):
            continue
        new = FakeQuantLinear(old.in_features, old.out_features, old.bias is not None,
                              device=old.weight.device, dtype=old.weight.dtype)
        new.load_state_dict(old.state_dict())
        new.levels = LEVELS[config.target]
        set_module(model, name, new)
    return names


def convert_qat_(model: nn.Module, target: Literal["onnxruntime", "torch"] = "onnxruntime") -> list[str]:
    """Turn fake-quantized layers into their deployable form, in place.

    ``torch``: :class:`slimkit.quantize.dynamic.DynamicInt8Linear` (per-channel), whose
    int8 weights are exactly the fake-quantized ones. ``onnxruntime``: plain Linear layers
    with the trained weights, ready for export and ``ort_dynamic_int8`` (per-channel),
    which rounds them to the same int8 values.

    Returns:
        The converted layers' qualified names.
    """
    from slimkit.quantize.api import TRANSFORMS_ATTR, record_transform
    from slimkit.quantize.dynamic import DynamicInt8Config, DynamicInt8Linear

    names = [n for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)]
    for name in names:
        fq = model.get_submodule(name)
        if target == "torch":
            set_module(model, name, DynamicInt8Linear.from_linear(fq, per_channel=True))
        else:
            plain = nn.Linear(fq.in_features, fq.out_features, fq.bias is not None, device=fq.weight.device)
            plain.load_state_dict(fq.state_dict())
            set_module(model, name, plain)
    # The saved description must rebuild what the model now is: no fake quantization, and
    # for PyTorch the int8 layers it became.
    history = [t for t in getattr(model, TRANSFORMS_ATTR, []) if t["config"]["method"] != QATConfig.method]
    object.__setattr__(model, TRANSFORMS_ATTR, history)
    if target == "torch" and names:
        record_transform(model, DynamicInt8Config(granularity="per_channel"), names)
    return names
