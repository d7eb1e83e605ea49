"""Storage shared by the int8 Linear layers: int8 weights, float scales, a float bias."""

from __future__ import annotations

import torch
from torch import nn

from slimkit.quantize.qparams import symmetric_int8


class Int8WeightLinear(nn.Module):
    """Base of the int8 Linear layers; subclasses say how they compute.

    Buffers: ``weight_int8`` ``[out, in]``, ``weight_scale`` (one per output channel, or
    one in all), and ``bias`` (float32, or None).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, per_channel: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features if per_channel else 1))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, per_channel: bool = True):
        """The layer with ``linear``'s weights rounded to symmetric int8."""
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, per_channel)
        q, scale = symmetric_int8(linear.weight, per_channel)
        m.weight_int8.copy_(q)
        m.weight_scale.copy_(scale)
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach().float())
        return m.to(linear.weight.device)
