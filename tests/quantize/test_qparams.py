"""Integer quantization of weight tensors: symmetric int8 and group-wise uint4."""

from __future__ import annotations

import pytest
import torch

from slimkit.quantize.qparams import dequantize_int8, groupwise_uint4, symmetric_int8, unpack_uint4


def weights(rows=8, cols=64, seed=0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def test_symmetric_int8_per_channel():
    w = weights()
    q, s = symmetric_int8(w, per_channel=True)
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert s.dtype == torch.float32 and s.shape == (8,)
    torch.testing.assert_close(s, w.abs().amax(1) / 127, rtol=0, atol=0)
    assert int(q.min()) >= -127 and int(q.max()) <= 127
    assert (q.abs().amax(1) == 127).all()  # every row uses its full range
    err = (dequantize_int8(q, s) - w).abs()
    assert bool((err <= s[:, None] / 2 + 1e-7).all())


def test_symmetric_int8_per_tensor():
    w = weights()
    q, s = symmetric_int8(w, per_channel=False)
    assert s.shape == (1,)
    torch.testing.assert_close(s, w.abs().amax().reshape(1) / 127, rtol=0, atol=0)
    err = (dequantize_int8(q, s) - w).abs()
    assert bool((err <= s / 2 + 1e-7).all())


def test_symmetric_int8_hand_made():
    w = torch.tensor([[1.27, -0.6, 0.0, 0.004, 0.006], [0.0, 0.0, 0.0, 0.0, 0.0]])
    q, s = symmetric_int8(w, per_channel=True)
    assert q.tolist() == [[127, -60, 0, 0, 1], [0, 0, 0, 0, 0]]
    assert float(s[0]) == pytest.approx(0.01)
    assert float(s[1]) == pytest.approx(1e-12)  # an all-zero row gets a tiny, not zero, scale
    assert torch.equal(dequantize_int8(q, s)[1], torch.zeros(5))


def test_dequantize_single_row_per_channel():
    w = torch.tensor([[0.5, -1.0]])
    q, s = symmetric_int8(w, per_channel=True)
    torch.testing.assert_close(dequantize_int8(q, s), w, rtol=0, atol=1.0 / 254)


def test_uint4_packs_low_nibble_first():
    # One row, one group of 4: lo=0, hi=15 so the codes are the values themselves.
    w = torch.tensor([[0.0, 15.0, 3.0, 12.0]])
    packed, scale, zero = groupwise_uint4(w, 4)
    assert packed.dtype == torch.uint8 and packed.shape == (1, 2)
    assert packed.tolist() == [[0 | (15 << 4), 3 | (12 << 4)]]
    assert scale.tolist() == [[1.0]] and zero.tolist() == [[0.0]]
    torch.testing.assert_close(unpack_uint4(packed, scale, zero, torch.float32), w, rtol=0, atol=0)


def test_uint4_shapes_and_range():
    w = weights(rows=6, cols=128)
    packed, scale, zero = groupwise_uint4(w, 32)
    assert packed.shape == (6, 64) and packed.dtype == torch.uint8
    assert scale.shape == zero.shape == (6, 4)
    assert float(zero.min()) >= 0 and float(zero.max()) <= 15
    d = unpack_uint4(packed, scale, zero, torch.float32)
    assert d.shape == w.shape and d.dtype == torch.float32
    step = scale.repeat_interleave(32, dim=1)
    assert bool(((d - w).abs() <= step / 2 + 1e-6).all())
    assert unpack_uint4(packed, scale, zero, torch.float64).dtype == torch.float64


def test_uint4_group_minimum_and_maximum_are_exact_when_range_spans_zero():
    w = weights(rows=4, cols=64)
    packed, scale, zero = groupwise_uint4(w, 64)
    d = unpack_uint4(packed, scale, zero, torch.float32)
    # The zero point is rounded, so ends are within one step; 0 itself is exact.
    assert bool(((d.amax(1) - w.amax(1)).abs() <= scale[:, 0] + 1e-6).all())
    zero_w = torch.zeros(4, 64)
    zero_w[:, 1::2] = w[:, 1::2]
    p2, s2, z2 = groupwise_uint4(zero_w, 64)
    d2 = unpack_uint4(p2, s2, z2, torch.float32)
    assert bool((d2[:, 0::2] == 0).all())


@pytest.mark.parametrize(
    "w",
    [
        torch.rand(4, 64, generator=torch.Generator().manual_seed(0)) + 1.0,  # all positive
        -torch.rand(4, 64, generator=torch.Generator().manual_seed(0)) - 1.0,  # all negative
        torch.full((2, 32), 0.5),  # constant
    ],
    ids=["positive", "negative", "constant"],
)
def test_uint4_group_that_does_not_span_zero(w):
    packed, scale, zero = groupwise_uint4(w, 32)
    d = unpack_uint4(packed, scale, zero, torch.float32)
    step = scale.repeat_interleave(32, dim=1)
    assert bool(((d - w).abs() <= step / 2 + 1e-6).all()), float((d - w).abs().max())
