"""ONNX Runtime int8: dynamic and static quantization of an exported tiny model."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from tiny_models import SPEC_MLP, inputs, mlp, mlp_seq

from slimkit.config import LayerSelector
from slimkit.deploy.export import ExportConfig, export
from slimkit.errors import ConfigError, DataError, LayerSelectionError
from slimkit.quantize import OrtDynamicInt8Config, OrtStaticInt8Config, quantize_
from slimkit.quantize.ort import check_finite
from slimkit.zoo.models import LoadedModel


@pytest.fixture
def exported(tmp_path):
    module, example = mlp()
    return export(LoadedModel(module, dict(SPEC_MLP), example_inputs=example), ExportConfig(optimize="none"), workdir=tmp_path)


def run_onnx(path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input_0": x.numpy()})[0]


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def op_types(path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def test_dynamic_int8(exported):
    fp32_path = exported.path
    x = inputs(64)
    ref = run_onnx(fp32_path, x)
    layers = quantize_(exported, OrtDynamicInt8Config())
    assert layers == ["0", "2"]
    assert exported.path != fp32_path and exported.path.name == "model.int8.onnx"
    assert fp32_path.is_file()  # the previous version is kept
    assert op_types(exported.path).count("MatMulInteger") == 2
    out = run_onnx(exported.path, x)
    assert out.shape == ref.shape == (64, 32)
    assert float(cosine_rows(ref, out).min()) >= 0.999  # measured 0.99995
    # Two thirds of the file were fp32 weights; now they are int8.
    assert exported.path.stat().st_size < 0.4 * fp32_path.stat().st_size
    assert exported._slimkit_transforms == [{"config": OrtDynamicInt8Config().to_dict(), "layers": ["0", "2"]}]


def test_dynamic_int8_per_tensor(exported):
    x = inputs(64)
    ref = run_onnx(exported.path, x)
    quantize_(exported, OrtDynamicInt8Config(per_channel=False))
    assert float(cosine_rows(ref, run_onnx(exported.path, x)).min()) >= 0.99


def export_seq(tmp_path):
    module, example = mlp_seq()
    spec = {"kind": "callable", "ref": "tiny_models:mlp_seq"}
    return export(LoadedModel(module, spec, example_inputs=example), ExportConfig(optimize="none"), workdir=tmp_path)


def test_dynamic_int8_ignore_keeps_a_matmul_layer_in_fp32(tmp_path):
    model = export_seq(tmp_path)
    assert op_types(model.path).count("MatMul") == 2
    layers = quantize_(model, OrtDynamicInt8Config(layers=LayerSelector(ignore=["2"])))
    assert layers == ["0"]
    nodes = {n.name: n.op_type for n in onnx.load(str(model.path)).graph.node}
    assert list(nodes.values()).count("MatMulInteger") == 1
    assert nodes["/2/MatMul"] == "MatMul"  # layer 2 is untouched


def test_dynamic_int8_ignore_keeps_a_gemm_layer_in_fp32(exported):
    layers = quantize_(exported, OrtDynamicInt8Config(layers=LayerSelector(ignore=["2"])))
    assert layers == ["0"]
    assert op_types(exported.path).count("MatMulInteger") == 1


def test_static_int8_ignore_keeps_a_gemm_layer_in_fp32(exported):
    calibration = [{"input_0": inputs(8, seed=s).numpy()} for s in range(3)]
    layers = quantize_(exported, OrtStaticInt8Config(calibration_samples=len(calibration), layers=LayerSelector(ignore=["2"])), calibration=calibration)
    assert layers == ["0"]
    graph = onnx.load(str(exported.path)).graph
    gemm2 = next(n for n in graph.node if n.name == "/2/Gemm")
    producers = {o: n.op_type for n in graph.node for o in n.output}
    # Layer 2's weight is still an fp32 initializer, not the output of a DequantizeLinear.
    assert gemm2.input[1] in {i.name for i in graph.initializer}
    assert producers.get(gemm2.input[1]) is None
    gemm0 = next(n for n in graph.node if n.name == "/0/Gemm")
    assert producers[gemm0.input[1]] == "DequantizeLinear"


def test_dynamic_int8_unknown_layer(exported):
    with pytest.raises(LayerSelectionError, match="'encoder.dense'"):
        quantize_(exported, OrtDynamicInt8Config(layers=LayerSelector(targets=["encoder.dense"])))


def test_static_int8(exported):
    x = inputs(64)
    ref = run_onnx(exported.path, x)
    calibration = [{"input_0": inputs(8, seed=s).numpy(), "unused": np.zeros(1)} for s in range(10, 20)]
    layers = quantize_(exported, OrtStaticInt8Config(calibration_samples=5), calibration=calibration)
    assert layers == ["0", "2"]
    assert exported.path.name == "model.qdq.onnx"
    ops = op_types(exported.path)
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    assert float(cosine_rows(ref, run_onnx(exported.path, x)).min()) >= 0.99


def test_static_int8_needs_calibration(exported):
    with pytest.raises(DataError, match="calibration"):
        quantize_(exported, OrtStaticInt8Config())
    with pytest.raises(DataError, match="calibration"):
        quantize_(exported, OrtStaticInt8Config(), calibration=[])


def test_static_int8_refuses_nan_calibration(exported):
    bad = inputs(4).numpy()
    bad[1, 3] = np.nan
    calibration = [{"input_0": inputs(4).numpy()}, {"input_0": bad}]
    with pytest.raises(DataError, match="calibration batch 1, input 'input_0'"):
        quantize_(exported, OrtStaticInt8Config(calibration_samples=len(calibration)), calibration=calibration)


@pytest.mark.parametrize("cfg", [OrtDynamicInt8Config(), OrtStaticInt8Config()])
def test_ort_methods_refuse_a_torch_model(cfg):
    module, _ = mlp()
    with pytest.raises(ConfigError, match="add an `export` stage"):
        quantize_(module, cfg, calibration=[{"input_0": np.zeros((1, 64), np.float32)}])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_check_finite_names_batch_and_input(bad):
    ok = {"input_ids": np.ones((2, 4), dtype=np.int64), "x": np.zeros((2, 4), dtype=np.float32)}
    broken = np.zeros((2, 4), dtype=np.float32)
    broken[1, 2] = bad
    with pytest.raises(DataError) as info:
        check_finite([ok, ok, {"input_ids": ok["input_ids"], "x": broken}])
    assert "calibration batch 2, input 'x'" in str(info.value)


def test_check_finite_accepts_finite_and_integer_data():
    check_finite([])
    check_finite([{"ids": np.array([[1, 2]]), "f16": np.ones(3, dtype=np.float16), "l": [0.5, 1.5]}])


def test_check_finite_checks_half_precision_and_lists():
    with pytest.raises(DataError, match="batch 0, input 'h'"):
        check_finite([{"h": np.array([np.inf], dtype=np.float16)}])
    with pytest.raises(DataError, match="batch 0, input 'l'"):
        check_finite([{"l": [1.0, float("nan")]}])


# -- static int8 with ranges trained by quantization-aware training -------------------

def exported_with_ranges(tmp_path, ranges):
    """The tiny MLP with trained input ranges recorded (as convert_qat_ does), exported."""
    from slimkit.quantize.static_int8 import InputRange, StaticInt8Config

    module, example = mlp()
    given = {name: InputRange(scale=s, zero_point=z) for name, (s, z) in ranges.items()}
    quantize_(module, StaticInt8Config(target="onnxruntime", input_ranges=given))
    loaded = LoadedModel(module, dict(SPEC_MLP), example_inputs=example)
    return export(loaded, ExportConfig(optimize="none"), workdir=tmp_path), loaded


def input_qparams(path) -> dict[str, tuple[float, int]]:
    """Scale and zero point of the activation feeding each Gemm, by node name."""
    graph = onnx.load(str(path)).graph
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    found = {}
    for node in graph.node:
        if node.op_type == "Gemm":
            dq = producer[node.input[0]]
            found[node.name] = (float(inits[dq.input[1]]), int(inits[dq.input[2]]))
    return found


TRAINED = {"0": (0.0234375, 128), "2": (0.015625, 0)}


def test_static_int8_uses_trained_ranges_without_calibration(tmp_path):
    model, source = exported_with_ranges(tmp_path, TRAINED)
    layers = quantize_(model, OrtStaticInt8Config(activation_ranges="trained"), source=source)
    assert layers == ["0", "2"]
    assert input_qparams(model.path) == {"/0/Gemm": TRAINED["0"], "/2/Gemm": TRAINED["2"]}
    # Outputs of the layers are not re-quantized: the fake-quantized model did not round them.
    graph = onnx.load(str(model.path)).graph
    consumers = {i: n.op_type for n in graph.node for i in n.input}
    assert all(consumers.get(n.output[0]) != "QuantizeLinear" for n in graph.node if n.op_type == "Gemm")
    x = inputs(16)
    with torch.no_grad():
        ref = source.module(x).numpy()
    assert float(cosine_rows(ref, run_onnx(model.path, x)).min()) >= 0.99


def test_static_int8_auto_calibrates_only_layers_without_a_trained_range(tmp_path):
    model, source = exported_with_ranges(tmp_path, {"0": TRAINED["0"]})
    with pytest.raises(DataError, match="layers without a trained range: 2"):
        quantize_(model, OrtStaticInt8Config(), source=source)
    calibration = [{"input_0": inputs(8, seed=s).numpy()} for s in range(3)]
    quantize_(model, OrtStaticInt8Config(calibration_samples=len(calibration)), calibration=calibration, source=source)
    found = input_qparams(model.path)
    assert found["/0/Gemm"] == TRAINED["0"] and found["/2/Gemm"] != TRAINED["2"]


def test_static_int8_trained_names_layers_without_a_range(tmp_path):
    model, source = exported_with_ranges(tmp_path, {"0": TRAINED["0"]})
    with pytest.raises(ConfigError, match="layer '2' has no trained input range"):
        quantize_(model, OrtStaticInt8Config(activation_ranges="trained"), source=source)
    with pytest.raises(ConfigError, match="pass source="):
        quantize_(model, OrtStaticInt8Config(activation_ranges="trained"))


def test_static_int8_calibrate_ignores_trained_ranges(tmp_path):
    model, source = exported_with_ranges(tmp_path, TRAINED)
    calibration = [{"input_0": inputs(8, seed=s).numpy()} for s in range(3)]
    quantize_(model, OrtStaticInt8Config(calibration_samples=len(calibration), activation_ranges="calibrate"), calibration=calibration, source=source)
    assert TRAINED["0"] not in input_qparams(model.path).values()


class LoadSpy:
    """Stands in for the ``onnx`` module in slimkit.quantize.ort, recording each load."""

    def __init__(self):
        self.external = []

    def __getattr__(self, name):
        return getattr(onnx, name)

    def load(self, path, *args, **kwargs):
        self.external.append(kwargs.get("load_external_data", True))
        return onnx.load(path, *args, **kwargs)


def with_external_weights(model):
    """Move the exported model's weights into an external file in a folder of their own."""
    folder = model.path.parent / "external"
    folder.mkdir()
    path = folder / "model.onnx"
    onnx.save(onnx.load(str(model.path)), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx.data", size_threshold=0)
    model.path = path
    return model


def test_static_int8_reads_the_graph_without_its_weights_when_calibrating(tmp_path, monkeypatch):
    import slimkit.quantize.ort as ort_module

    model, source = exported_with_ranges(tmp_path, TRAINED)
    with_external_weights(model)
    spy = LoadSpy()
    monkeypatch.setattr(ort_module, "onnx", spy)
    calibration = [{"input_0": inputs(8, seed=s).numpy()} for s in range(3)]
    quantize_(model, OrtStaticInt8Config(calibration_samples=len(calibration), activation_ranges="calibrate"), calibration=calibration, source=source)
    assert spy.external and set(spy.external) == {False}  # the graph, never its weights
    assert not (tmp_path / "model.ranges.onnx").exists()


def test_static_int8_writes_trained_ranges_into_a_model_with_external_weights(tmp_path):
    model, source = exported_with_ranges(tmp_path, TRAINED)
    with_external_weights(model)
    quantize_(model, OrtStaticInt8Config(activation_ranges="trained"), source=source)
    # The intermediate model keeps its weights external, next to it (not in external/).
    ranges = onnx.load(str(tmp_path / "model.ranges.onnx"), load_external_data=False)
    assert {e.value for t in ranges.graph.initializer for e in t.external_data if e.key == "location"} == {
        "model.ranges.onnx.data"}
    assert input_qparams(model.path) == {"/0/Gemm": TRAINED["0"], "/2/Gemm": TRAINED["2"]}
    x = inputs(16)
    with torch.no_grad():
        ref = source.module(x).numpy()
    assert float(cosine_rows(ref, run_onnx(model.path, x)).min()) >= 0.99


def test_dynamic_fallback_scores_layers_on_fallback_samples_inputs(exported, monkeypatch):
    from slimkit.quantize import sensitivity

    seen = []
    real = sensitivity.linear_sensitivity

    def spy(module, names, calibration, per_channel=True, samples=32):
        seen.append((sorted(names), samples))
        return real(module, names, calibration, per_channel, samples)

    monkeypatch.setattr(sensitivity, "linear_sensitivity", spy)
    module, example = mlp()
    source = LoadedModel(module, dict(SPEC_MLP), example_inputs=example)
    feeds = [{"input": inputs(4, seed=i).numpy()} for i in range(8)]
    layers = quantize_(exported, OrtDynamicInt8Config(fallback_layers=1, fallback_samples=3), calibration=feeds,
                       source=source)
    assert seen == [(["0", "2"], 3)]
    assert len(layers) == 1 and op_types(exported.path).count("MatMulInteger") == 1


def exported_cnn(tmp_path):
    from tiny_models import tiny_classifier

    module, example = tiny_classifier()
    return export(LoadedModel(module.eval(), {"kind": "callable", "ref": "tiny_models:tiny_classifier"},
                              example_inputs=example), ExportConfig(), workdir=tmp_path), module


@pytest.mark.parametrize("ops, between", [("auto", True), ("all", True), ("weighted", False)])
def test_static_int8_keeps_a_cnn_int8_between_its_layers(tmp_path, ops, between):
    onnx_model, module = exported_cnn(tmp_path)
    g = torch.Generator().manual_seed(3)
    calibration = [{"input_0": torch.rand(2, 3, 16, 16, generator=g).numpy()} for _ in range(8)]
    layers = quantize_(onnx_model, OrtStaticInt8Config(calibration_samples=len(calibration), ops=ops), calibration=calibration)
    assert layers == ["block.0", "block.3", "head", "stem.0"]
    graph = onnx.load(str(onnx_model.path)).graph
    consumers = {i: n.op_type for n in graph.node for i in n.input}
    (add,) = [n for n in graph.node if n.op_type == "Add"]
    # The residual add's sum is quantized for the next layer, or left in float.
    assert (consumers[add.output[0]] == "QuantizeLinear") == between
    assert ("Relu" in {n.op_type for n in graph.node}) != between, "a quantized Relu folds into its range"
    x = torch.rand(4, 3, 16, 16, generator=g)
    with torch.no_grad():
        ref = module(x).numpy()
    out = run_onnx(onnx_model.path, x)
    assert cosine_rows(out, ref).min() > 0.98


def test_static_int8_refuses_fewer_calibration_examples_than_asked(exported):
    calibration = [{"input_0": inputs(8, seed=s).numpy()} for s in range(3)]
    with pytest.raises(DataError, match="asked for calibration_samples=128 train-split examples but got 3"):
        quantize_(exported, OrtStaticInt8Config(), calibration=calibration)
    assert exported.path.name == "model.export.onnx"  # nothing was written in its place
