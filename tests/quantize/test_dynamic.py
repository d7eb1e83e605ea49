"""Dynamic int8 Linear: accuracy (SQNR), buffers, fallbacks and the fbgemm cache."""

from __future__ import annotations

import pytest
import torch
from tiny_models import inputs, min_cosine, mlp, sqnr_db
from torch import nn

from slimkit.config import LayerSelector
from slimkit.errors import LayerSelectionError
from slimkit.quantize import DynamicInt8Config, quantize_
from slimkit.quantize.dynamic import DynamicInt8Linear


def quantized(cfg: DynamicInt8Config) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    module, _ = mlp()
    x = inputs(256)
    with torch.no_grad():
        ref = module(x)
        names = quantize_(module, cfg)
        out = module(x)
    assert names == ["0", "2"] or cfg.layers.ignore
    return module, ref, out


def test_per_channel_sqnr_and_cosine():
    # Measured 33.6 dB / 0.9993 (activations are quantized to 7 bits by fbgemm).
    _, ref, out = quantized(DynamicInt8Config())
    assert sqnr_db(ref, out) >= 30.0
    assert min_cosine(ref, out) >= 0.998


def test_per_tensor_sqnr_on_evenly_scaled_layers():
    # Default init gives rows of similar scale, so per-tensor is about as good here (33.7 dB).
    _, ref, out = quantized(DynamicInt8Config(granularity="per_tensor"))
    assert sqnr_db(ref, out) >= 30.0


def skewed_linear() -> nn.Linear:
    """16 output rows whose scales span three decades."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 16)
    with torch.no_grad():
        lin.weight.mul_(torch.logspace(-3, 0, 16)[:, None])
        lin.bias.zero_()
    return lin


def per_channel_sqnr(ref: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return 10 * torch.log10((ref.double() ** 2).sum(0) / ((ref.double() - out.double()) ** 2).sum(0))


def test_per_channel_beats_per_tensor_on_rows_of_different_scales():
    lin = skewed_linear()
    x = inputs(512)
    with torch.no_grad():
        ref = lin(x)
        pc = DynamicInt8Linear.from_linear(lin, per_channel=True)(x)
        pt = DynamicInt8Linear.from_linear(lin, per_channel=False)(x)
    worst_pc = float(per_channel_sqnr(ref, pc).min())  # measured 33.8 dB
    worst_pt = float(per_channel_sqnr(ref, pt).min())  # measured -0.3 dB: small rows round to 0
    assert worst_pc >= 30.0
    assert worst_pt <= 5.0
    assert worst_pc > worst_pt + 25.0


def test_buffers_shapes_and_dtypes():
    module, _, _ = quantized(DynamicInt8Config())
    q0, q2 = module[0], module[2]
    assert isinstance(q0, DynamicInt8Linear) and isinstance(q2, DynamicInt8Linear)
    assert isinstance(module[1], nn.ReLU)
    shapes = {k: (tuple(v.shape), v.dtype) for k, v in module.state_dict().items()}
    assert shapes == {
        "0.weight_int8": ((128, 64), torch.int8),
        "0.weight_scale": ((128,), torch.float32),
        "0.bias": ((128,), torch.float32),
        "2.weight_int8": ((32, 128), torch.int8),
        "2.weight_scale": ((32,), torch.float32),
        "2.bias": ((32,), torch.float32),
    }
    assert list(module.parameters()) == []
    assert "per_channel" in repr(q0)


def test_per_tensor_has_one_scale():
    module, _, _ = quantized(DynamicInt8Config(granularity="per_tensor"))
    assert module[0].weight_scale.shape == (1,)
    assert "per_tensor" in repr(module[0])


def test_weights_and_scales_are_symmetric_int8_of_the_original():
    lin = mlp()[0][0]
    q = DynamicInt8Linear.from_linear(lin, per_channel=True)
    torch.testing.assert_close(q.weight_scale, lin.weight.detach().abs().amax(1) / 127.0)
    assert int(q.weight_int8.abs().amax(1).min()) == 127
    err = (q.weight_int8.float() * q.weight_scale[:, None] - lin.weight.detach()).abs()
    assert bool((err <= q.weight_scale[:, None] / 2 + 1e-7).all())
    torch.testing.assert_close(q.bias, lin.bias.detach(), rtol=0, atol=0)


def test_ignore_keeps_a_layer_in_fp32():
    module, _ = mlp()
    names = quantize_(module, DynamicInt8Config(layers=LayerSelector(ignore=["2"])))
    assert names == ["0"]
    assert isinstance(module[0], DynamicInt8Linear)
    assert type(module[2]) is nn.Linear


def test_unknown_target_is_an_error():
    module, _ = mlp()
    with pytest.raises(LayerSelectionError, match="'3'"):
        quantize_(module, DynamicInt8Config(layers=LayerSelector(targets=["3"])))
    assert type(module[0]) is nn.Linear  # nothing was changed


def test_no_bias_and_any_leading_shape():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(64, 8, bias=False))
    x = torch.randn(2, 3, 64)
    with torch.no_grad():
        ref = module(x)
        quantize_(module, DynamicInt8Config())
        out = module(x)
    assert module[0].bias is None
    assert out.shape == (2, 3, 8)
    assert sqnr_db(ref, out) >= 33.0  # measured 36.9 dB


def test_emulated_path_for_other_dtypes_matches_reference():
    # float64 input takes the floating-point emulation (no fbgemm), which uses the same
    # 7-bit activation grid as the CPU kernel: the two paths agree almost exactly.
    module, _ = mlp()
    x = inputs(256)
    with torch.no_grad():
        ref = module(x)
        quantize_(module, DynamicInt8Config())
        out64 = module(x.double())
        out32 = module(x)
    assert out64.dtype == torch.float64
    assert sqnr_db(ref, out64) >= 30.0  # measured 33.6 dB
    assert sqnr_db(out32, out64.float()) >= 100.0  # measured 147 dB


def test_packed_weights_are_refreshed_after_load_state_dict():
    a, _ = mlp()
    torch.manual_seed(42)
    b = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))
    quantize_(a, DynamicInt8Config())
    quantize_(b, DynamicInt8Config())
    x = inputs(8)
    with torch.no_grad():
        a(x)  # packs a's weights
        a.load_state_dict(b.state_dict())
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def test_outputs_are_deterministic():
    module, _, _ = quantized(DynamicInt8Config())
    x = inputs(16)
    with torch.no_grad():
        torch.testing.assert_close(module(x), module(x), rtol=0, atol=0)
