"""Weight-only int8 / int4: accuracy, exact buffer layout, skipped layers, file size."""

from __future__ import annotations

import struct

import pytest
import torch
from tiny_models import embed_mlp, inputs, min_cosine, mlp, ragged_mlp, sqnr_db, wide
from torch import nn

from slimkit.config import LayerSelector
from slimkit.quantize import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
from slimkit.quantize.weight_only import (
    Int4WeightOnlyLinear,
    Int8WeightOnlyEmbedding,
    Int8WeightOnlyLinear,
)
from slimkit.serialize import save
from slimkit.zoo.models import LoadedModel


def run(cfg, factory=mlp, x=None):
    module, example = factory()
    x = inputs(256) if x is None else x
    with torch.no_grad():
        ref = module(x)
        names = quantize_(module, cfg)
        out = module(x)
    return module, names, ref, out


def layout(module: nn.Module) -> dict:
    return {k: (tuple(v.shape), v.dtype) for k, v in module.state_dict().items()}


# --- int8 -------------------------------------------------------------------------------


def test_int8_sqnr_and_cosine():
    _, names, ref, out = run(Int8WeightOnlyConfig())
    assert names == ["0", "2"]
    assert sqnr_db(ref, out) >= 42.0  # measured 45.6 dB
    assert min_cosine(ref, out) >= 0.9999


def test_int8_layout():
    module, _, _, _ = run(Int8WeightOnlyConfig())
    assert isinstance(module[0], Int8WeightOnlyLinear) and isinstance(module[2], Int8WeightOnlyLinear)
    assert layout(module) == {
        "0.weight_int8": ((128, 64), torch.int8),
        "0.weight_scale": ((128,), torch.float32),
        "0.bias": ((128,), torch.float32),
        "2.weight_int8": ((32, 128), torch.int8),
        "2.weight_scale": ((32,), torch.float32),
        "2.bias": ((32,), torch.float32),
    }


def test_int8_output_follows_the_input_dtype():
    module, _, _, _ = run(Int8WeightOnlyConfig())
    with torch.no_grad():
        y = module(inputs(4).double())
    assert y.dtype == torch.float64


def test_int8_embedding_is_quantized_and_gathers_int8_rows():
    module, example = embed_mlp()
    (ids,) = example
    with torch.no_grad():
        ref_rows = module.emb(ids)
        ref = module(ids)
        names = quantize_(module, Int8WeightOnlyConfig())
        rows = module.emb(ids)
        out = module(ids)
    assert names == ["emb", "head"]
    assert isinstance(module.emb, Int8WeightOnlyEmbedding)
    assert layout(module) == {
        "emb.weight_int8": ((100, 64), torch.int8),
        "emb.weight_scale": ((100,), torch.float32),
        "head.weight_int8": ((16, 64), torch.int8),
        "head.weight_scale": ((16,), torch.float32),
        "head.bias": ((16,), torch.float32),
    }
    assert rows.shape == ref_rows.shape == (3, 8, 64) and rows.dtype == torch.float32
    # Each row is within half a step of its own scale.
    step = module.emb.weight_scale[ids][..., None]
    assert bool(((rows - ref_rows).abs() <= step / 2 + 1e-7).all())
    assert sqnr_db(ref, out) >= 40.0  # measured 42.5 dB


def test_int8_include_embeddings_false_keeps_the_table():
    module, example = embed_mlp()
    names = quantize_(module, Int8WeightOnlyConfig(include_embeddings=False))
    assert names == ["head"]
    assert type(module.emb) is nn.Embedding


def test_int8_target_only_embeddings():
    module, _ = embed_mlp()
    names = quantize_(module, Int8WeightOnlyConfig(layers=LayerSelector(targets=["emb"])))
    assert names == ["emb"] and type(module.head) is nn.Linear


def test_int8_safetensors_is_a_quarter_of_fp32(tmp_path):
    module, example = wide()
    fp32 = LoadedModel(module, {"kind": "callable", "ref": "tiny_models:wide"}, example_inputs=example)
    save(fp32, tmp_path / "fp32")
    q = fp32.clone()
    quantize_(q.module, Int8WeightOnlyConfig())
    save(q, tmp_path / "int8")
    size32 = (tmp_path / "fp32" / "model.safetensors").stat().st_size
    size8 = (tmp_path / "int8" / "model.safetensors").stat().st_size
    # int8 weights, plus fp32 scales and biases (2 x 256 floats per layer): 0.2568 of fp32.
    assert size8 / size32 == pytest.approx(0.25, abs=0.01)
    # The file is its tensors' bytes plus a small JSON header: nothing else is stored.
    for folder, module_ in (("fp32", fp32.module), ("int8", q.module)):
        raw = (tmp_path / folder / "model.safetensors").read_bytes()
        (header,) = struct.unpack("<Q", raw[:8])
        payload = sum(t.numel() * t.element_size() for t in module_.state_dict().values())
        assert len(raw) == 8 + header + payload
        assert header < 1024


# --- int4 -------------------------------------------------------------------------------


@pytest.mark.parametrize(("group", "measured"), [(64, 21.3), (32, 21.5)])
def test_int4_sqnr(group, measured):
    _, names, ref, out = run(Int4WeightOnlyConfig(group_size=group))
    assert names == ["0", "2"]
    assert sqnr_db(ref, out) >= measured - 2.5
    assert min_cosine(ref, out) >= 0.98  # measured 0.989


@pytest.mark.parametrize(
    ("group", "scale_dtype", "torch_dtype"),
    [(64, "float16", torch.float16), (32, "float32", torch.float32), (128, "float16", torch.float16)],
)
def test_int4_layout(group, scale_dtype, torch_dtype):
    module, _ = mlp()
    names = quantize_(module, Int4WeightOnlyConfig(group_size=group, scale_dtype=scale_dtype))
    # Layer 0 has 64 inputs: with groups of 128 it keeps its precision.
    assert names == (["2"] if group == 128 else ["0", "2"])
    expected = {}
    for name, (inp, out) in {"0": (64, 128), "2": (128, 32)}.items():
        if name not in names:
            expected |= {f"{name}.weight": ((out, inp), torch.float32), f"{name}.bias": ((out,), torch.float32)}
            continue
        assert isinstance(module.get_submodule(name), Int4WeightOnlyLinear)
        expected |= {
            f"{name}.weight_uint4x2": ((out, inp // 2), torch.uint8),
            f"{name}.weight_scale": ((out, inp // group), torch_dtype),
            f"{name}.weight_zero": ((out, inp // group), torch.uint8),
            f"{name}.bias": ((out,), torch.float32),
        }
    assert layout(module) == expected
    for name in names:
        assert int(module.get_submodule(name).weight_zero.max()) <= 15


def test_int4_codes_reconstruct_within_half_a_step():
    lin = mlp()[0][0]
    q = Int4WeightOnlyLinear.from_linear(lin, 32, torch.float32)
    lo_nibble, hi_nibble = q.weight_uint4x2 & 0x0F, q.weight_uint4x2 >> 4
    codes = torch.stack((lo_nibble, hi_nibble), -1).reshape(128, 64).float()
    scale = q.weight_scale.repeat_interleave(32, dim=1)
    zero = q.weight_zero.float().repeat_interleave(32, dim=1)
    w = (codes - zero) * scale
    assert bool(((w - lin.weight.detach()).abs() <= scale / 2 + 1e-6).all())


def test_int4_skips_layers_whose_width_is_not_a_multiple_of_the_group():
    module, names, ref, out = run(Int4WeightOnlyConfig(group_size=32), factory=ragged_mlp)
    assert names == ["0", "4"]
    assert isinstance(module[0], Int4WeightOnlyLinear)
    assert type(module[2]) is nn.Linear  # 48 inputs
    assert isinstance(module[4], Int4WeightOnlyLinear)
    assert sqnr_db(ref, out) >= 19.5  # measured 22.2 dB


def test_int4_output_dtype_follows_input():
    module, _ = mlp()
    quantize_(module, Int4WeightOnlyConfig())
    with torch.no_grad():
        assert module(inputs(2).double()).dtype == torch.float64
        assert module(inputs(2)).dtype == torch.float32


def test_int4_no_bias():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(64, 8, bias=False))
    x = inputs(16)
    with torch.no_grad():
        ref = module(x)
        quantize_(module, Int4WeightOnlyConfig())
        out = module(x)
    assert module[0].bias is None
    assert sqnr_db(ref, out) >= 20.0  # measured 22.9 dB


def test_int4_layer_with_all_positive_weights():
    torch.manual_seed(0)
    lin = nn.Linear(64, 16)
    with torch.no_grad():
        lin.weight.copy_(torch.rand(16, 64) * 0.1 + 0.05)
    module = nn.Sequential(lin)
    x = inputs(64)
    with torch.no_grad():
        ref = module(x)
        quantize_(module, Int4WeightOnlyConfig())
        out = module(x)
    assert sqnr_db(ref, out) >= 20.0
