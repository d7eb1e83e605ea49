"""Half precision: fp16 or bf16 weights, or autocast around chosen layers."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from slimkit.config import LayerSelector, SlimConfig
from slimkit.layers import select_modules, set_module
from slimkit.registry import register


class LowPrecisionConfig(SlimConfig):
    """Run chosen Linear layers in fp16 or bf16.

    Attributes:
        dtype: ``bf16`` keeps fp32's range (safe for activations with outliers);
            ``fp16`` has more mantissa but overflows above 65504.
        mode: ``weights`` stores the weights in ``dtype`` (half the size);
            ``autocast`` keeps fp32 weights and computes under ``torch.autocast``.
    """

    kind = "quantize"
    method = "low_precision"
    dtype: Literal["fp16", "bf16"] = "bf16"
    mode: Literal["weights", "autocast"] = "weights"
    layers: LayerSelector = Field(default_factory=LayerSelector)


DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class HalfLinear(nn.Module):
    """Linear with half-precision weights; inputs are cast in, outputs cast back."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().to(dtype), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)


class AutocastLinear(nn.Linear):
    """A Linear whose matmul runs under autocast; its parameters keep their names."""

    autocast_dtype: torch.dtype = torch.bfloat16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=self.autocast_dtype):
            out = super().forward(x)
        return out.to(x.dtype)


@register(LowPrecisionConfig)
def _apply(model: nn.Module, config: LowPrecisionConfig, **_) -> list[str]:
    names = select_modules(model, config.layers, (nn.Linear,))
    dtype = DTYPES[config.dtype]
    for name in names:
        old = model.get_submodule(name)
        if config.mode == "weights":
            set_module(model, name, HalfLinear(old, dtype))
        else:
            new = AutocastLinear(old.in_features, old.out_features, old.bias is not None, device=old.weight.device)
            new.load_state_dict(old.state_dict())
            new.autocast_dtype = dtype
            set_module(model, name, new)
    return names
