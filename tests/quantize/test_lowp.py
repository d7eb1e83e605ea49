"""Half precision: fp16/bf16 weights, or autocast around fp32 weights."""

from __future__ import annotations

import pytest
import torch
from tiny_models import inputs, min_cosine, mlp, sqnr_db
from torch import nn

from slimkit.config import LayerSelector
from slimkit.quantize import LowPrecisionConfig, quantize_
from slimkit.quantize.lowp import AutocastLinear, HalfLinear

# Measured on the tiny MLP: bf16 49.1 dB, fp16 67.1 dB (same for both modes).
MIN_SQNR = {"bf16": 46.0, "fp16": 63.0}
TORCH = {"bf16": torch.bfloat16, "fp16": torch.float16}


def run(cfg: LowPrecisionConfig):
    module, _ = mlp()
    original = {k: v.clone() for k, v in module.state_dict().items()}
    x = inputs(256)
    with torch.no_grad():
        ref = module(x)
        names = quantize_(module, cfg)
        out = module(x)
    return module, original, names, ref, out


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_weights_mode(dtype):
    module, original, names, ref, out = run(LowPrecisionConfig(dtype=dtype))
    assert names == ["0", "2"]
    assert isinstance(module[0], HalfLinear) and isinstance(module[2], HalfLinear)
    assert out.dtype == torch.float32
    assert sqnr_db(ref, out) >= MIN_SQNR[dtype]
    assert min_cosine(ref, out) >= 0.9999
    sd = module.state_dict()
    assert list(sd) == list(original)  # same names as nn.Linear
    for k, v in sd.items():
        assert v.dtype == TORCH[dtype] and v.shape == original[k].shape
        torch.testing.assert_close(v, original[k].to(TORCH[dtype]), rtol=0, atol=0)
    assert not any(p.requires_grad for p in module.parameters())


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_autocast_mode_keeps_fp32_weights(dtype):
    module, original, names, ref, out = run(LowPrecisionConfig(dtype=dtype, mode="autocast"))
    assert names == ["0", "2"]
    assert type(module[0]) is AutocastLinear and module[0].autocast_dtype == TORCH[dtype]
    assert out.dtype == torch.float32
    assert sqnr_db(ref, out) >= MIN_SQNR[dtype]
    sd = module.state_dict()
    assert list(sd) == list(original)
    for k, v in sd.items():
        torch.testing.assert_close(v, original[k], rtol=0, atol=0)


def test_bf16_changes_the_outputs():
    # Guards against a no-op: the SQNR bounds above must come from real rounding.
    _, _, _, ref, out = run(LowPrecisionConfig())
    assert not torch.equal(ref, out)


def test_ignore_and_targets():
    module, _ = mlp()
    assert quantize_(module, LowPrecisionConfig(layers=LayerSelector(ignore=["0"]))) == ["2"]
    assert type(module[0]) is nn.Linear and isinstance(module[2], HalfLinear)


def test_half_linear_without_bias():
    lin = nn.Linear(8, 4, bias=False)
    h = HalfLinear(lin, torch.float16)
    assert h.bias is None
    x = torch.randn(3, 8)
    assert h(x).dtype == torch.float32
    torch.testing.assert_close(h(x), lin(x).detach(), rtol=1e-2, atol=1e-2)
