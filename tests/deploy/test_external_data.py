"""Models over 2 GB keep their weights in one external-data file, through every step.

Tiny models stand in for large ones: their weights are moved to external files the way
the exporter writes a model over protobuf's 2 GB limit (one file per tensor).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from tiny_models import SPEC_MLP, inputs, mlp

from slimkit import serialize
from slimkit.deploy.export import ExportConfig, export
from slimkit.deploy.onnx_model import external_tensors, one_data_file
from slimkit.quantize import OrtDynamicInt8Config, OrtFp16Config, OrtStaticInt8Config, quantize_
from slimkit.zoo.models import LoadedModel


def run(path, x) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input_0": x})[0]


@pytest.fixture
def external(tmp_path):
    """An exported MLP whose weights sit in one file per tensor, as the exporter leaves a large model."""
    module, example = mlp()
    model = export(LoadedModel(module, dict(SPEC_MLP), example_inputs=example), ExportConfig(optimize="none"),
                   workdir=tmp_path / "work")
    proto = onnx.load(str(model.path))
    onnx.save(proto, str(model.path), save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)
    assert len(set(external_tensors(onnx.load(str(model.path), load_external_data=False)).values())) == 4
    return model, module


def test_one_data_file_gathers_the_weights_and_removes_the_others(external):
    model, module = external
    x = inputs(4).numpy()
    ref = run(model.path, x)
    one_data_file(model.path)
    assert set(external_tensors(onnx.load(str(model.path), load_external_data=False)).values()) == {
        "model.export.onnx.data"}
    assert sorted(p.name for p in model.path.parent.iterdir()) == ["model.export.onnx", "model.export.onnx.data"]
    np.testing.assert_array_equal(run(model.path, x), ref)


def test_a_saved_model_carries_its_data_file_and_loads(external, tmp_path):
    model, module = external
    x = inputs(4).numpy()
    ref = run(model.path, x)
    serialize.save(model, tmp_path / "saved")
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == ["model.onnx", "model.onnx.data", "slimkit.json"]
    loaded = serialize.load(tmp_path / "saved")
    np.testing.assert_array_equal(run(loaded.path, x), ref)


@pytest.mark.parametrize("config", [OrtDynamicInt8Config(), OrtStaticInt8Config(calibration_samples=4), OrtFp16Config()],
                         ids=["dynamic", "static", "fp16"])
def test_quantized_versions_keep_external_weights(external, tmp_path, config):
    model, module = external
    one_data_file(model.path)
    x = inputs(8).numpy()
    ref = run(model.path, x)
    quantize_(model, config, calibration=[{"input_0": inputs(8, seed=s).numpy()} for s in range(4)])
    proto = onnx.load(str(model.path), load_external_data=False)
    assert set(external_tensors(proto).values()) == {f"{model.path.name}.data"}
    out = run(model.path, x)
    cos = (out * ref).sum(-1) / np.linalg.norm(out, axis=-1) / np.linalg.norm(ref, axis=-1)
    assert cos.min() >= 0.99
