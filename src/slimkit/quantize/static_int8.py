"""Static int8 for Linear and Conv2d: int8 weights and a fixed int8 range for each input.

Each layer's input is rounded to uint8 with a scale and zero point fixed in advance
(normally trained by quantization-aware training: :func:`slimkit.quantize.qat.convert_qat_`
writes this config), weights to per-output-channel symmetric int8. The products are
summed exactly in integers: on CPU by PyTorch's int8 GEMM (``torch._int_mm``), elsewhere,
and for grouped convolutions, as whole numbers carried in floating point, which is exact
at these sizes. Every path therefore gives the same numbers.

With ``target="onnxruntime"`` the PyTorch layers are left as they are and the ranges are
only recorded: a later ``ort_static_int8`` stage puts them into the exported model.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from slimkit.config import LayerSelector, SlimConfig
from slimkit.errors import ConfigError
from slimkit.layers import select_names, set_module
from slimkit.quantize.int8_linear import Int8WeightLinear
from slimkit.quantize.qparams import symmetric_int8
from slimkit.registry import register

QMAX = 255  # activations are uint8: codes 0..255
_EXACT_F32 = 2**24  # whole numbers up to this size are exact in float32


class InputRange(BaseModel):
    """The uint8 grid of a layer's input: ``x ~ (q - zero_point) * scale`` with q in 0..255.

    Real 0 is the code ``zero_point`` exactly, so zero padding and ReLU zeros lose nothing.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    scale: float = Field(gt=0)
    zero_point: int = Field(ge=0, le=QMAX)


class StaticInt8Config(SlimConfig):
    """Static int8 of Linear and Conv2d layers with given input ranges.

    Attributes:
        target: ``torch`` swaps the layers for :class:`StaticInt8Linear` /
            :class:`StaticInt8Conv2d`; ``onnxruntime`` leaves them in floating point and
            records the ranges for a later ``ort_static_int8`` stage (after export).
        input_ranges: each layer's input range, by qualified name.
        layers: which of the layers named in ``input_ranges`` (default: all of them).
    """

    kind = "quantize"
    method = "static_int8"
    target: Literal["torch", "onnxruntime"] = "torch"
    input_ranges: dict[str, InputRange] = Field(default_factory=dict)
    layers: LayerSelector = Field(default_factory=LayerSelector)


def quantize_uint8(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """The uint8 codes of ``x`` as whole floats in [0, 255]; the same rounding as
    ONNX Runtime's QuantizeLinear (half to even) and as the fake-quantized layers."""
    return torch.clamp(torch.round(x.float() / scale) + zero_point, 0, QMAX)


@functools.cache
def _cpu_int_mm() -> bool:
    """Whether this PyTorch build has the int8 GEMM on CPU (recent ones all do)."""
    try:
        torch._int_mm(torch.ones(1, 8, dtype=torch.int8), torch.ones(8, 1, dtype=torch.int8))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return True


def _exact_dtype(terms: int) -> torch.dtype:
    # A sum of `terms` products of a uint8 code offset (|.| <= 255) and an int8 weight
    # (|.| <= 127) is a whole number that float32 holds exactly below 2**24.
    return torch.float32 if terms * QMAX * 127 < _EXACT_F32 else torch.float64


class _StaticInput(nn.Module):
    """Input scale and zero point buffers, and the integer GEMM both layers use."""

    def _init_input(self) -> None:
        self.register_buffer("input_scale", torch.ones(()))
        self.register_buffer("input_zero_point", torch.zeros((), dtype=torch.int64))
        self._gemm_weight = None  # [in, out] int8 and column sums, derived from the buffers
        self.register_load_state_dict_post_hook(lambda m, _: setattr(m, "_gemm_weight", None))

    def _set_input(self, r: InputRange) -> None:
        self.input_scale.fill_(r.scale)
        self.input_zero_point.fill_(r.zero_point)

    def _int8_gemm(self, codes: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``sum_k (codes - zero_point) * w`` exactly, as float32; ``codes`` [m, k], ``w`` int8 [out, k]."""
        zp = self.input_zero_point
        if codes.device.type == "cpu" and _cpu_int_mm():
            if self._gemm_weight is None:
                self._gemm_weight = (w.t().contiguous(), w.sum(1, dtype=torch.int32))
            wt, colsum = self._gemm_weight
            # _int_mm takes int8 on both sides: shift the uint8 codes by 128 into int8 and
            # add the shift back through the weights' column sums.
            acc = torch._int_mm((codes - 128).to(torch.int8).contiguous(), wt)
            return (acc + (128 - zp.to(torch.int32)) * colsum).float()
        dt = _exact_dtype(w.shape[1])
        return (codes.to(dt) - zp.to(dt)) @ w.t().to(dt)

    def _output(self, acc: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out = acc.float() * (self.input_scale * self.weight_scale)
        return out if bias is None else out + bias


class StaticInt8Linear(Int8WeightLinear, _StaticInput):
    """A Linear with int8 weights and a fixed uint8 input range, computed in integers.

    Buffers: those of :class:`Int8WeightLinear`, ``input_scale`` and ``input_zero_point``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, per_channel: bool = True):
        super().__init__(in_features, out_features, bias, per_channel)
        self._init_input()

    @classmethod
    def from_float(cls, linear: nn.Linear, input_range: InputRange) -> StaticInt8Linear:
        """``linear`` with its weights rounded to per-output-channel symmetric int8.

        Args:
            linear: the float layer; it is not changed.
            input_range: the uint8 grid its input is rounded to.

        Returns:
            The new layer, on ``linear``'s device.
        """
        m = cls.from_linear(linear, per_channel=True)
        m._set_input(input_range)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codes = quantize_uint8(x, self.input_scale, self.input_zero_point)
        acc = self._int8_gemm(codes.reshape(-1, self.in_features), self.weight_int8)
        out = self._output(acc, self.bias)
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, input_scale={float(self.input_scale):.3g}, input_zero_point={int(self.input_zero_point)}"


class StaticInt8Conv2d(_StaticInput):
    """A Conv2d with per-output-channel int8 weights and a fixed uint8 input range.

    Ungrouped convolutions run as im2col plus the int8 GEMM on CPU; grouped ones (and
    every convolution off CPU) sum whole numbers in floating point, exactly.

    Buffers: ``weight_int8`` ``[out, in/groups, kh, kw]``, ``weight_scale`` ``[out]``,
    ``bias`` (or None), ``input_scale``, ``input_zero_point``.
    """

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.dilation = conv.kernel_size, conv.stride, conv.dilation
        self.groups, self.padding_mode = conv.groups, conv.padding_mode
        # (left, right, top, bottom), what nn.Conv2d itself pads with for "same" and non-zero modes.
        self.pad = tuple(conv._reversed_padding_repeated_twice)
        self.register_buffer("weight_int8", torch.zeros(conv.weight.shape, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(conv.out_channels))
        self.register_buffer("bias", torch.zeros(conv.out_channels) if conv.bias is not None else None)
        self._init_input()

    @classmethod
    def from_float(cls, conv: nn.Conv2d, input_range: InputRange) -> StaticInt8Conv2d:
        """``conv`` with its weights rounded to per-output-channel symmetric int8.

        Args:
            conv: the float layer (any stride, padding, dilation, groups and padding
                mode); it is not changed.
            input_range: the uint8 grid its input is rounded to.

        Returns:
            The new layer, on ``conv``'s device.
        """
        m = cls(conv)
        q, scale = symmetric_int8(conv.weight.flatten(1), per_channel=True)
        m.weight_int8.copy_(q.reshape(conv.weight.shape))
        m.weight_scale.copy_(scale)
        if conv.bias is not None:
            m.bias.copy_(conv.bias.detach().float())
        m._set_input(input_range)
        return m.to(conv.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        unbatched = x.dim() == 3
        codes = quantize_uint8(x.unsqueeze(0) if unbatched else x, self.input_scale, self.input_zero_point)
        if self.padding_mode == "zeros":
            # Real 0 is the code zero_point.
            codes = F.pad(codes, self.pad, value=float(self.input_zero_point))
        else:
            codes = F.pad(codes, self.pad, mode=self.padding_mode)
        n, _, h, w = codes.shape
        kh, kw = self.kernel_size
        ho = (h - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        wo = (w - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        if codes.device.type == "cpu" and self.groups == 1 and _cpu_int_mm():
            cols = F.unfold(codes, self.kernel_size, dilation=self.dilation, stride=self.stride)
            acc = self._int8_gemm(cols.transpose(1, 2).reshape(n * ho * wo, -1), self.weight_int8.flatten(1))
            acc = acc.reshape(n, ho * wo, self.out_channels).transpose(1, 2).reshape(n, self.out_channels, ho, wo)
        else:
            dt = _exact_dtype(self.weight_int8[0].numel())
            zp = self.input_zero_point.to(dt)
            acc = F.conv2d(codes.to(dt) - zp, self.weight_int8.to(dt), None, self.stride, 0, self.dilation, self.groups)
        out = acc.float() * (self.input_scale * self.weight_scale)[:, None, None]
        if self.bias is not None:
            out = out + self.bias[:, None, None]
        return (out.squeeze(0) if unbatched else out).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"groups={self.groups}, input_scale={float(self.input_scale):.3g}, "
                f"input_zero_point={int(self.input_zero_point)}")


@register(StaticInt8Config)
def _apply(model: nn.Module, config: StaticInt8Config, **_) -> list[str]:
    if not config.input_ranges:
        raise ConfigError(
            "static_int8: input_ranges is empty; give each layer's input scale and zero point "
            "(convert_qat_ writes them after quantization-aware training)"
        )
    names = select_names(list(config.input_ranges), config.layers)
    problems = []
    for name in names:
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            problems.append(f"input_ranges: the model has no layer {name!r}")
            continue
        if not isinstance(layer, (nn.Linear, nn.Conv2d)):
            problems.append(f"input_ranges: layer {name!r} is a {type(layer).__name__}, not a Linear or Conv2d")
    if problems:
        raise ConfigError(problems)
    if config.target == "torch":
        for name in names:
            layer = model.get_submodule(name)
            cls = StaticInt8Linear if isinstance(layer, nn.Linear) else StaticInt8Conv2d
            set_module(model, name, cls.from_float(layer, config.input_ranges[name]))
    return names
