"""Static int8 Linear and Conv2d: exact integer sums, every padding, clear errors."""

import pytest
import torch
from pydantic import ValidationError
from torch import nn
from torch.nn import functional as F

from slimkit.errors import ConfigError
from slimkit.quantize import quantize_, static_int8
from slimkit.quantize.static_int8 import (
    InputRange,
    StaticInt8Config,
    StaticInt8Conv2d,
    StaticInt8Linear,
    quantize_uint8,
)

RANGE = InputRange(scale=0.02, zero_point=130)


def reference(layer, x):
    """The layer's arithmetic from its buffers, summed in float64 (exact for these sizes)."""
    codes = quantize_uint8(x, layer.input_scale, layer.input_zero_point).double() - int(layer.input_zero_point)
    w = layer.weight_int8.double()
    if isinstance(layer, StaticInt8Linear):
        acc = codes @ w.t()
        scale = layer.input_scale * layer.weight_scale
    else:
        if layer.padding_mode != "zeros":
            codes = F.pad(codes, layer.pad, mode=layer.padding_mode)
        else:
            codes = F.pad(codes, layer.pad)
        acc = F.conv2d(codes, w, None, layer.stride, 0, layer.dilation, layer.groups)
        scale = (layer.input_scale * layer.weight_scale)[:, None, None]
    out = acc.float() * scale
    return out if layer.bias is None else out + (layer.bias if acc.dim() == 2 else layer.bias[:, None, None])


@pytest.fixture(params=["int8_gemm", "float_sum"])
def path(request, monkeypatch):
    """Both ways of summing: PyTorch's int8 GEMM, and whole numbers in floating point
    (used off CPU); they must give the same bits."""
    if request.param == "float_sum":
        monkeypatch.setattr(static_int8, "_cpu_int_mm", lambda: False)
    return request.param


def test_linear_sums_exactly_in_integers(path):
    torch.manual_seed(0)
    layer = StaticInt8Linear.from_float(nn.Linear(40, 24), RANGE)
    x = torch.randn(2, 3, 40) * 2  # some inputs fall outside the range and are clipped
    out = layer(x)
    assert out.shape == (2, 3, 24)
    assert torch.equal(out, reference(layer, x.reshape(-1, 40)).reshape(2, 3, 24))


@pytest.mark.parametrize("kwargs", [
    {"padding": 1},
    {"stride": 2, "dilation": 2, "bias": False},
    {"padding": "same", "padding_mode": "reflect"},
    {"padding": 1, "groups": 4},  # grouped: whole numbers summed in float, still exact
])
def test_conv_sums_exactly_in_integers(kwargs, path):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, **kwargs)
    layer = StaticInt8Conv2d.from_float(conv, RANGE)
    x = torch.randn(2, 8, 9, 9) * 2
    out = layer(x)
    assert out.shape == conv(x).shape
    assert torch.equal(out, reference(layer, x))
    assert torch.equal(layer(x[0]), out[0])  # unbatched input


def test_config_swaps_only_the_named_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(16, 2), nn.Linear(2, 2))
    ranges = {"0": RANGE, "2": InputRange(scale=0.1, zero_point=0)}
    assert quantize_(model, StaticInt8Config(input_ranges=ranges)) == ["0", "2"]
    assert [type(m) for m in model] == [StaticInt8Conv2d, nn.Flatten, StaticInt8Linear, nn.Linear]
    assert float(model[2].input_scale) == pytest.approx(0.1) and int(model[2].input_zero_point) == 0
    assert model(torch.randn(1, 3, 4, 4)).shape == (1, 2)


def test_onnxruntime_target_only_records_the_ranges():
    model = nn.Sequential(nn.Linear(4, 4))
    assert quantize_(model, StaticInt8Config(target="onnxruntime", input_ranges={"0": RANGE})) == ["0"]
    assert type(model[0]) is nn.Linear


def test_bad_configs_name_the_problem():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(ConfigError, match="input_ranges is empty"):
        quantize_(model, StaticInt8Config())
    with pytest.raises(ConfigError, match="layer '1' is a ReLU, not a Linear or Conv2d"):
        quantize_(model, StaticInt8Config(input_ranges={"1": RANGE}))
    with pytest.raises(ConfigError) as info:  # every bad layer at once
        quantize_(model, StaticInt8Config(input_ranges={"head": RANGE, "1": RANGE, "0": RANGE, "tail": RANGE}))
    assert info.value.problems == [
        "input_ranges: the model has no layer 'head'",
        "input_ranges: layer '1' is a ReLU, not a Linear or Conv2d",
        "input_ranges: the model has no layer 'tail'",
    ]
    with pytest.raises(ValidationError):
        InputRange(scale=0.1, zero_point=256)
    with pytest.raises(ValidationError):
        InputRange(scale=0.0, zero_point=0)
