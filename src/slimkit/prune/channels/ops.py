"""The modules and operations the channel analysis understands, and how it names them."""

from __future__ import annotations

import operator
from typing import Any

from torch import fx, nn

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# Modules that act on each channel separately and have no per-channel parameters.
PASS_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid,
    nn.Tanh, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Hardtanh, nn.Softplus, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
)
# Functions and tensor methods of the same kind, by name (torch.*, F.*, x.method()).
PASS_OPS = {
    "relu", "relu_", "relu6", "gelu", "silu", "mish", "hardswish", "hardsigmoid", "sigmoid",
    "sigmoid_", "tanh", "tanh_", "leaky_relu", "elu", "selu", "celu", "hardtanh", "softplus",
    "clamp", "clamp_", "clamp_min", "clamp_max", "clip", "abs", "neg", "exp", "square",
    "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
    "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
    "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d", "interpolate",
    "contiguous", "clone", "detach", "float", "half", "bfloat16", "to",
}
ELEMENTWISE = {"add", "sub", "mul", "truediv", "div", "iadd", "isub", "imul", "itruediv", "add_", "sub_", "mul_", "div_"}
REDUCE = {"mean", "sum", "amax", "amin"}
RESHAPE = {"view", "reshape"}
SQUEEZE = {"squeeze", "squeeze_"}
UNSQUEEZE = {"unsqueeze", "unsqueeze_"}
# x.expand_as(y) broadcasts x to y's shape, as x * y would.
BROADCAST_AS = {"expand_as"}
CAT = {"cat", "concat", "concatenate"}
# Ops that read only a tensor's shape or type: they do not constrain its channels.
SHAPE_ONLY = {"size", "dim", "numel", "getattr"}


def op_name(node: fx.Node) -> str:
    """A function or method node's name: ``relu`` for ``torch.relu``, ``F.relu`` and ``x.relu()``."""
    if node.op == "call_method":
        return str(node.target)
    target = node.target
    if target is getattr:
        return "getattr"
    module = getattr(target, "__module__", "") or ""
    name = getattr(target, "__name__", str(target))
    if module.startswith("torch") or module in ("_operator", "operator") or target in vars(operator).values():
        return name
    return f"{module}.{name}" if module else name


def arg(node: fx.Node, position: int, keyword: str, default: Any) -> Any:
    """Argument ``position`` of a call, whether it was passed by position or as ``keyword``."""
    if len(node.args) > position:
        return node.args[position]
    return node.kwargs.get(keyword, default)
