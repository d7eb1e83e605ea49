"""Export of a tiny callable model to ONNX: same outputs as PyTorch, saved and loaded."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from tiny_models import SPEC_MLP, inputs, mlp

from slimkit.deploy.export import ExportConfig, export
from slimkit.deploy.onnx_model import OnnxModel
from slimkit.errors import SlimkitError
from slimkit.quantize import OrtDynamicInt8Config, quantize_
from slimkit.serialize import load, save
from slimkit.zoo.models import LoadedModel


def loaded() -> LoadedModel:
    module, example = mlp()
    return LoadedModel(module, dict(SPEC_MLP), example_inputs=example)


def run_onnx(path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input_0": x.numpy()})[0]


def test_export_matches_torch(tmp_path):
    model = loaded()
    onnx_model = export(model, ExportConfig(optimize="none"), workdir=tmp_path)
    assert isinstance(onnx_model, OnnxModel)
    assert onnx_model.path == tmp_path / "model.export.onnx"
    assert onnx_model.workdir == tmp_path
    assert onnx_model.spec == SPEC_MLP and onnx_model.tokenizer is None
    graph = onnx.load(str(onnx_model.path)).graph
    assert [i.name for i in graph.input] == ["input_0"]
    assert [o.name for o in graph.output] == ["output"]
    assert [n.name for n in graph.node] == ["/0/Gemm", "/1/Relu", "/2/Gemm"]
    assert onnx.load(str(onnx_model.path)).opset_import[0].version == 17
    # The batch axis is dynamic: other batch sizes than the example's 4 run too.
    for batch in (1, 4, 9):
        x = inputs(batch, seed=batch)
        with torch.no_grad():
            ref = model.module(x).numpy()
        torch.testing.assert_close(torch.from_numpy(run_onnx(onnx_model.path, x)), torch.from_numpy(ref), rtol=0, atol=1e-5)


def test_export_opset(tmp_path):
    onnx_model = export(loaded(), ExportConfig(opset=18, optimize="none"), workdir=tmp_path)
    assert onnx.load(str(onnx_model.path)).opset_import[0].version == 18


def test_auto_optimize_leaves_non_bert_models_alone(tmp_path):
    onnx_model = export(loaded(), ExportConfig(), workdir=tmp_path)
    assert onnx_model.path.name == "model.export.onnx"


def test_export_without_example_inputs(tmp_path):
    module, _ = mlp()
    with pytest.raises(SlimkitError, match="no example inputs"):
        export(LoadedModel(module, dict(SPEC_MLP)), ExportConfig(optimize="none"), workdir=tmp_path)


def test_exported_and_quantized_model_saves_and_loads(tmp_path):
    onnx_model = export(loaded(), ExportConfig(optimize="none"), workdir=tmp_path / "work")
    quantize_(onnx_model, OrtDynamicInt8Config())
    x = inputs(16)
    before = run_onnx(onnx_model.path, x)
    meta = save(onnx_model, tmp_path / "saved")
    assert meta["framework"] == "onnx" and meta["weights"] == "model.onnx"
    assert [t["config"]["method"] for t in meta["transforms"]] == ["ort_dynamic_int8"]
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == ["model.onnx", "slimkit.json"]
    back = load(tmp_path / "saved")
    assert isinstance(back, OnnxModel)
    assert back.path == tmp_path / "saved" / "model.onnx"
    assert back.spec == SPEC_MLP
    assert back._slimkit_transforms == meta["transforms"]
    np.testing.assert_array_equal(run_onnx(back.path, x), before)


class _Bessel(torch.nn.Module):
    def forward(self, x):
        return torch.special.bessel_j0(x)  # no ONNX symbolic


def test_an_operator_without_onnx_export_is_named_with_its_layer(tmp_path):
    module = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Sequential(torch.nn.ReLU(), _Bessel()))
    model = LoadedModel(module, {"kind": "callable", "ref": "x:y"}, example_inputs=(torch.randn(1, 4),))
    with pytest.raises(SlimkitError, match=r"operator 'aten::special_bessel_j0' in layer '1.1' \(_Bessel\) has no "
                                           r"ONNX export at opset 17; .*register_custom_op_symbolic"):
        export(model, ExportConfig(optimize="none"), workdir=tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing half-written
