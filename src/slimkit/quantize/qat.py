"""Quantization-aware training: train through the int8 rounding, then convert.

``quantize_(model, QATConfig())`` swaps Linear (and, if asked, Conv2d) layers for
:class:`FakeQuantLinear` / :class:`FakeQuantConv2d`, which compute in floating point
exactly what the deployed int8 kernel will: per-output-channel symmetric int8 weights,
and uint8 activations whose range is either taken per call (``dynamic``, as PyTorch's and
ONNX Runtime's dynamic int8 do) or fixed: tracked during training (``observed``) or
trained (``learned``). Rounding passes gradients straight through. Train with
:func:`slimkit.distill.distill`, the fp32 model as teacher, then :func:`convert_qat_` for
the target runtime.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from slimkit.config import LayerSelector, SlimConfig
from slimkit.errors import ConfigError
from slimkit.layers import select_modules, set_module
from slimkit.quantize.static_int8 import (
    QMAX,
    InputRange,
    StaticInt8Config,
    StaticInt8Conv2d,
    StaticInt8Linear,
)
from slimkit.registry import register

# Dynamic activation levels per runtime: PyTorch's x86 kernel uses 7 bits (reduce_range),
# ONNX Runtime's DynamicQuantizeLinear the full 8.
LEVELS = {"torch": 127.0, "onnxruntime": 255.0}
# Fixed ranges use all 8 bits on both: slimkit's static int8 layers sum in exact integers,
# so they do not need PyTorch's 7-bit guard against int16 overflow.
STATIC_LEVELS = float(QMAX)
_INT32 = (-(2.0**31), 2.0**31 - 1)
_MODULES = {"linear": nn.Linear, "conv2d": nn.Conv2d}


class QATConfig(SlimConfig):
    """Prepare Linear (and Conv2d) layers for quantization-aware training.

    Attributes:
        target: the runtime whose int8 arithmetic is simulated, and which
            :func:`convert_qat_` converts to.
        activations: how each layer's input is quantized. ``dynamic``: over each call's
            own range, as dynamic int8 runtimes do. ``observed``: a fixed per-tensor range,
            the running (exponential moving average) min and max of the input over
            training batches, frozen in eval mode. ``learned``: a fixed range whose ends
            are trained with the weights (LSQ-style gradients through the scale),
            initialised from the first training batch. Fixed ranges deploy as static
            int8, which needs no range computation at run time.
        modules: which layer types to prepare: ``linear``, ``conv2d``. Conv2d layers
            need a fixed range (``observed`` or ``learned``): PyTorch has no dynamic int8
            convolution, and ONNX Runtime's rounds convolution weights per tensor.
        range_momentum: ``observed`` only: the weight of each new batch in the running
            min and max (PyTorch's observers use 0.01).
        freeze_ranges_after: ``observed`` only: stop updating the ranges after this many
            training batches, so that the weights train against a fixed grid for the
            rest of the run. ``None`` tracks them until training ends.
        layers: which layers, among those of the chosen types.
    """

    kind = "quantize"
    method = "qat_int8"
    target: Literal["onnxruntime", "torch"] = "onnxruntime"
    activations: Literal["dynamic", "observed", "learned"] = "dynamic"
    modules: list[Literal["linear", "conv2d"]] = Field(default_factory=lambda: ["linear"], min_length=1)
    range_momentum: float = Field(0.01, gt=0, le=1)
    freeze_ranges_after: int | None = Field(None, ge=1)
    layers: LayerSelector = Field(default_factory=LayerSelector)

    @model_validator(mode="after")
    def _freeze_needs_observed(self) -> QATConfig:
        if self.freeze_ranges_after is not None and self.activations != "observed":
            raise ValueError(
                "freeze_ranges_after applies to activations='observed' only; remove it "
                f"(activations is {self.activations!r})"
            )
        return self


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    # Round forward, identity backward (the straight-through estimator). Written as
    # value + (x - x) so that the forward value is exactly round(x).
    return torch.round(x) + (x - x.detach())


def _grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    # Exactly the same value, gradient times g (LSQ's step-size gradient scale).
    return x.detach() + (x * g - (x * g).detach())


def weight_scale(w: torch.Tensor) -> torch.Tensor:
    """Per-output-channel symmetric int8 scales ``[out]``, as
    :func:`slimkit.quantize.qparams.symmetric_int8` (and ONNX Runtime) compute them."""
    return (w.detach().abs().flatten(1).amax(dim=1) / 127.0).clamp(min=1e-12)


def fake_quant_weight(w: torch.Tensor) -> torch.Tensor:
    """Per-output-channel symmetric int8 (any number of dimensions after the first)."""
    scale = weight_scale(w).reshape(-1, *[1] * (w.dim() - 1))
    return torch.clamp(_round_ste(w / scale), -127, 127) * scale


def fake_quant_dynamic(x: torch.Tensor, levels: float) -> torch.Tensor:
    """Asymmetric per-tensor quantization over the range of ``x`` (always including 0)."""
    lo = x.detach().amin().clamp(max=0)
    hi = x.detach().amax().clamp(min=0)
    scale = ((hi - lo) / levels).clamp(min=1e-12)
    zero = torch.round(-lo / scale)
    q = torch.clamp(_round_ste(x / scale) + zero, 0, levels)
    return (q - zero) * scale


def static_qparams(lo: torch.Tensor, hi: torch.Tensor, levels: float = STATIC_LEVELS) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of the uint8 grid over ``[lo, hi]`` widened to include 0.

    The zero point is a whole number in [0, levels], so real 0 is exactly a code.
    Differentiable in ``lo`` and ``hi`` (the rounding of the zero point passes straight through).
    """
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    scale = ((hi - lo) / levels).clamp(min=1e-8)
    zero = torch.clamp(_round_ste(-lo / scale), 0, levels)
    return scale, zero


def fake_quant_static(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, levels: float = STATIC_LEVELS) -> torch.Tensor:
    """Round ``x`` onto a fixed uint8 grid. The gradient reaches ``x`` inside the range
    and ``scale`` (LSQ: the rounding error inside, the clipped end outside)."""
    q = torch.clamp(_round_ste(x / scale) + zero, 0, levels)
    return (q - zero) * scale


def fake_quant_bias(b: torch.Tensor, input_scale: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """The bias as ONNX Runtime's static quantizer stores it for Gemm and Conv: int32 on
    the grid ``input_scale * weight_scale`` (divided in float64, clipped to int32)."""
    step = input_scale.detach().float() * w_scale.float()
    q = torch.round(b.detach().double() / step.double()).clamp(*_INT32)
    return q.float() * step + (b - b.detach())


class _FakeQuantInput:
    """The input side shared by the fake-quantized layers: mode, range, rounding."""

    target: str = "onnxruntime"
    activations: str = "dynamic"
    levels: float = LEVELS["onnxruntime"]
    range_momentum: float = 0.01
    freeze_ranges_after: int | None = None

    def _setup_input(self, config: QATConfig) -> None:
        self.target, self.activations = config.target, config.activations
        self.range_momentum, self.freeze_ranges_after = config.range_momentum, config.freeze_ranges_after
        if config.activations == "dynamic":
            self.levels = LEVELS[config.target]
            return
        self.levels = STATIC_LEVELS
        dev = self.weight.device
        for end in ("input_min", "input_max"):
            value = torch.zeros((), device=dev)
            if config.activations == "learned":
                setattr(self, end, nn.Parameter(value))
            else:
                self.register_buffer(end, value)
        # Training batches seen; 0 means no range yet. A buffer, so checkpoints keep it.
        self.register_buffer("input_observed", torch.zeros((), dtype=torch.long, device=dev))

    @property
    def has_range(self) -> bool:
        """Whether a fixed range has been observed (always True for ``dynamic``)."""
        return self.activations == "dynamic" or int(self.input_observed) > 0

    def _track(self, x: torch.Tensor) -> None:
        with torch.no_grad():
            lo, hi = x.detach().amin().float(), x.detach().amax().float()
            seen = int(self.input_observed)
            if seen == 0:
                self.input_min.copy_(lo)
                self.input_max.copy_(hi)
            elif self.activations == "observed" and (self.freeze_ranges_after is None or seen < self.freeze_ranges_after):
                self.input_min.lerp_(lo, self.range_momentum)
                self.input_max.lerp_(hi, self.range_momentum)
            self.input_observed += 1

    def input_qparams(self, features: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point of the fixed input range (``features``: input elements
        per example, for LSQ's gradient scale)."""
        lo, hi = self.input_min, self.input_max
        if self.activations == "learned":
            g = 1.0 / math.sqrt(features * self.levels)
            lo, hi = _grad_scale(lo, g), _grad_scale(hi, g)
        return static_qparams(lo, hi, self.levels)

    def _quantize_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The rounded input, and its scale if the range is fixed."""
        if self.activations == "dynamic":
            return fake_quant_dynamic(x, self.levels), None
        if self.training:
            self._track(x)
        if not self.has_range:
            # Evaluated before any training batch (e.g. by the trainer's set-up): round
            # over the call's own range rather than a meaningless one; nothing is recorded.
            return fake_quant_dynamic(x, self.levels), None
        scale, zero = self.input_qparams(x[0].numel() if x.dim() > 1 else x.numel())
        return fake_quant_static(x, scale, zero, self.levels), scale


class FakeQuantLinear(_FakeQuantInput, nn.Linear):
    """A Linear that computes as its int8 deployment will; its parameters keep their names.

    With a fixed range it also holds ``input_min`` / ``input_max`` (buffers, or parameters
    when learned) and ``input_observed`` (training batches seen).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq, in_scale = self._quantize_input(x)
        bias = self.bias
        # The exporter makes a Linear on 2-D input a Gemm, whose bias ONNX Runtime's static
        # quantizer stores in int32; on higher-rank input it is MatMul + Add, bias in float.
        if in_scale is not None and bias is not None and self.target == "onnxruntime" and x.dim() == 2:
            bias = fake_quant_bias(bias, in_scale, weight_scale(self.weight))
        return F.linear(xq, fake_quant_weight(self.weight), bias)


class FakeQuantConv2d(_FakeQuantInput, nn.Conv2d):
    """A Conv2d that computes as its int8 deployment will (per-output-channel weights)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq, in_scale = self._quantize_input(x)
        bias = self.bias
        if in_scale is not None and bias is not None and self.target == "onnxruntime":
            bias = fake_quant_bias(bias, in_scale, weight_scale(self.weight))
        return self._conv_forward(xq, fake_quant_weight(self.weight), bias)


def _fake_quant_copy(old: nn.Module, config: QATConfig) -> nn.Module:
    w = old.weight
    if isinstance(old, nn.Linear):
        new = FakeQuantLinear(old.in_features, old.out_features, old.bias is not None, device=w.device, dtype=w.dtype)
    else:
        new = FakeQuantConv2d(old.in_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
                              old.dilation, old.groups, old.bias is not None, old.padding_mode,
                              device=w.device, dtype=w.dtype)
    new.load_state_dict(old.state_dict())
    new._setup_input(config)  # after loading: the range buffers are not in the old layer
    return new.train(old.training)  # an eval-mode model must not start recording ranges


def _no_dynamic_conv(name: str) -> str:
    return (f"layer {name!r} is a Conv2d with dynamic activations, which neither runtime deploys with "
            "per-channel int8 weights (PyTorch has no dynamic int8 convolution, ONNX Runtime's rounds "
            "weights per tensor); use activations='observed' or 'learned', or leave it out with layers.ignore")


@register(QATConfig)
def _prepare(model: nn.Module, config: QATConfig, **_) -> list[str]:
    names = select_modules(model, config.layers, tuple(_MODULES[m] for m in config.modules))
    if config.activations == "dynamic":
        bad = [n for n in names if isinstance(model.get_submodule(n), nn.Conv2d)]
        if bad:
            raise ConfigError([_no_dynamic_conv(n) for n in bad])
    for name in names:
        old = model.get_submodule(name)
        if not isinstance(old, _FakeQuantInput):
            set_module(model, name, _fake_quant_copy(old, config))
    return names


def convert_qat_(model: nn.Module, target: Literal["onnxruntime", "torch"] | None = None) -> list[str]:
    """Turn fake-quantized layers into their deployable form, in place.

    Args:
        model: a model prepared with :class:`QATConfig` (and trained).
        target: the runtime; by default the ``target`` each layer was prepared for. A
            different one is refused: its arithmetic is not what the layer trained with.

    ``torch``: dynamic layers become :class:`slimkit.quantize.dynamic.DynamicInt8Linear`
    (per-channel); fixed-range layers become
    :class:`~slimkit.quantize.static_int8.StaticInt8Linear` /
    :class:`~slimkit.quantize.static_int8.StaticInt8Conv2d`. Their int8 weights are exactly
    the fake-quantized ones. ``onnxruntime``: plain Linear / Conv2d layers with the trained
    weights, ready for export and ``ort_dynamic_int8`` (dynamic; ``per_channel``) or
    ``ort_static_int8`` (fixed ranges, which are recorded on the model for it), which
    round them to the same int8 values.

    Returns:
        The converted layers' qualified names.

    Raises:
        ConfigError: listing every layer that was prepared for another target, or that
            has a fixed range but never saw a training batch.
    """
    from slimkit.quantize.api import TRANSFORMS_ATTR, record_transform
    from slimkit.quantize.dynamic import DynamicInt8Config, DynamicInt8Linear

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, _FakeQuantInput)]
    problems = []
    for name, fq in layers:
        if target is not None and target != fq.target:
            problems.append(
                f"layer {name!r} was trained for {fq.target}'s int8 arithmetic; convert it with "
                f"target={fq.target!r}, or prepare it with QATConfig(target={target!r}) and train again"
            )
        elif not fq.has_range:
            problems.append(
                f"layer {name!r} has no input range yet ({fq.activations} activations); train it first "
                "(every forward pass in train mode records one), or prepare it with activations='dynamic'"
            )
    if problems:
        raise ConfigError(problems)

    dynamic_torch: list[str] = []
    ranges: dict[str, dict[str, InputRange]] = {"torch": {}, "onnxruntime": {}}
    for name, fq in layers:
        fixed = None
        if fq.activations != "dynamic":
            with torch.no_grad():
                scale, zero = fq.input_qparams()
            fixed = InputRange(scale=float(scale), zero_point=int(zero))
            ranges[fq.target][name] = fixed
        if fq.target == "torch" and fixed is None:
            dynamic_torch.append(name)
            set_module(model, name, DynamicInt8Linear.from_linear(fq, per_channel=True))
        elif fq.target == "torch":
            cls = StaticInt8Linear if isinstance(fq, nn.Linear) else StaticInt8Conv2d
            set_module(model, name, cls.from_float(fq, fixed))
        else:
            set_module(model, name, _plain_copy(fq))
    # The saved description must rebuild what the model now is: no fake quantization; for
    # PyTorch the int8 layers it became; for ONNX Runtime the ranges ort_static_int8 needs.
    history = [t for t in getattr(model, TRANSFORMS_ATTR, []) if t["config"]["method"] != QATConfig.method]
    object.__setattr__(model, TRANSFORMS_ATTR, history)
    if dynamic_torch:
        record_transform(model, DynamicInt8Config(granularity="per_channel"), dynamic_torch)
    for t, found in ranges.items():
        if found:
            record_transform(model, StaticInt8Config(target=t, input_ranges=found), list(found))
    return [n for n, _ in layers]


def _plain_copy(fq: nn.Module) -> nn.Module:
    w = fq.weight
    if isinstance(fq, nn.Linear):
        plain = nn.Linear(fq.in_features, fq.out_features, fq.bias is not None, device=w.device, dtype=w.dtype)
    else:
        plain = nn.Conv2d(fq.in_channels, fq.out_channels, fq.kernel_size, fq.stride, fq.padding, fq.dilation,
                          fq.groups, fq.bias is not None, fq.padding_mode, device=w.device, dtype=w.dtype)
    params = {k: v for k, v in fq.state_dict().items() if k in ("weight", "bias")}
    plain.load_state_dict(params)
    return plain.train(fq.training)
