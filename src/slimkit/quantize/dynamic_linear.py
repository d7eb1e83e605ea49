"""The dynamic int8 Linear layer: int8 weights, activations quantized per call.

On CPU it runs PyTorch's fbgemm/x86 int8 GEMM; elsewhere the same arithmetic is emulated
in floating point.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from slimkit.quantize.int8_linear import Int8WeightLinear
from slimkit.quantize.qparams import dequantize_int8


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
