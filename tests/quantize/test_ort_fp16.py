"""ort_fp16: an exported model in float16 for ONNX Runtime, inputs and outputs float32."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from tiny_models import SPEC_MLP, inputs, mlp

from slimkit.config import LayerSelector
from slimkit.deploy.export import ExportConfig, export
from slimkit.deploy.ort_runtime import OrtRunner
from slimkit.errors import ConfigError
from slimkit.quantize import OrtFp16Config, quantize_
from slimkit.serialize import load, save
from slimkit.zoo.models import LoadedModel


def exported(tmp_path):
    module, example = mlp()
    return module, export(LoadedModel(module, dict(SPEC_MLP), example_inputs=example), ExportConfig(optimize="none"),
                          workdir=tmp_path)


def cosine(a, b):
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_fp16_halves_the_weights_and_answers_like_fp32(tmp_path):
    module, model = exported(tmp_path)
    before = model.path.stat().st_size
    x = inputs(8)
    ref = module(x).detach().numpy()
    quantize_(model, OrtFp16Config())
    graph = onnx.load(str(model.path)).graph
    assert {t.data_type for t in graph.initializer if t.dims} == {onnx.TensorProto.FLOAT16}
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # callers feed float32
    assert model.path.stat().st_size < 0.55 * before
    out = OrtRunner(str(model.path))(x.numpy())
    assert out.dtype == np.float32 and cosine(out, ref) >= 0.9999
    save(model, tmp_path / "saved")
    np.testing.assert_array_equal(OrtRunner(str(load(tmp_path / "saved").path))(x.numpy()), out)


def test_ignored_layers_stay_float32(tmp_path):
    _, model = exported(tmp_path)
    layers = quantize_(model, OrtFp16Config(layers=LayerSelector(ignore=["2"])))
    graph = onnx.load(str(model.path)).graph
    fp32 = [t.name for t in graph.initializer if t.dims and t.data_type == onnx.TensorProto.FLOAT]
    assert fp32 and "2" not in layers


def test_fp16_needs_an_exported_model():
    module, _ = mlp()
    with pytest.raises(ConfigError, match="method 'ort_fp16' quantizes an ONNX model; add an `export` stage"):
        quantize_(module, OrtFp16Config())
