"""Sessions slimkit opens: the options that make measurement fair and CPU inference fast."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from onnx.numpy_helper import from_array

from slimkit.deploy.ort_runtime import DISABLED_FUSIONS, session_options

HIDDEN = 16


def residual_layer_norm() -> bytes:
    """``LayerNorm(x + skip)``: the pattern ONNX Runtime fuses into SkipLayerNormalization."""
    value = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, "seq", HIDDEN])  # noqa: E731
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "skip"], ["sum"]),
         helper.make_node("LayerNormalization", ["sum", "gamma", "beta"], ["y"], axis=-1, epsilon=1e-12)],
        "residual", [value("x"), value("skip")], [value("y")],
        [from_array(np.linspace(0.5, 1.5, HIDDEN, dtype=np.float32), "gamma"),
         from_array(np.linspace(-0.1, 0.1, HIDDEN, dtype=np.float32), "beta")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def optimized_ops(options: ort.SessionOptions, tmp_path, name: str) -> list[str]:
    options.optimized_model_filepath = str(tmp_path / f"{name}.onnx")
    ort.InferenceSession(residual_layer_norm(), options, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]


def test_cpu_sessions_keep_the_residual_add_apart_from_its_layer_norm(tmp_path):
    assert "SkipLayerNormFusion" in DISABLED_FUSIONS
    # Left to itself, ONNX Runtime fuses the two; the fused kernel is the slower one on CPU.
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert optimized_ops(plain, tmp_path, "plain") == ["SkipLayerNormalization"]
    assert optimized_ops(session_options(1), tmp_path, "cpu") == ["Add", "LayerNormalization"]


def test_the_fusion_is_left_to_gpu_sessions():
    entry = "optimization.disable_specified_optimizers"
    assert session_options(2).get_session_config_entry(entry) == "SkipLayerNormFusion"
    with pytest.raises(RuntimeError, match=entry):  # not set at all
        session_options(2, device="cuda").get_session_config_entry(entry)
    options = session_options(2, device="cuda:0")
    assert options.intra_op_num_threads == 2 and options.inter_op_num_threads == 1


def test_outputs_do_not_depend_on_the_fusion():
    rng = np.random.default_rng(0)
    feeds = {k: rng.standard_normal((1, 5, HIDDEN)).astype(np.float32) for k in ("x", "skip")}
    plain = ort.InferenceSession(residual_layer_norm(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    ours = ort.InferenceSession(residual_layer_norm(), session_options(1), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    s = feeds["x"] + feeds["skip"]
    ref = (s - s.mean(-1, keepdims=True)) / np.sqrt(s.var(-1, keepdims=True) + 1e-12)
    ref = ref * np.linspace(0.5, 1.5, HIDDEN) + np.linspace(-0.1, 0.1, HIDDEN)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)
    np.testing.assert_allclose(ours, plain, rtol=0, atol=1e-5)


def test_a_device_whose_provider_is_not_installed_is_an_error_naming_those_that_are():
    import onnxruntime as ort

    from slimkit.deploy.ort_runtime import providers
    from slimkit.errors import SlimkitError

    assert providers("cpu") == ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(SlimkitError, match=r"device 'cuda:0' needs ONNX Runtime's CUDAExecutionProvider, which "
                                               r"this installation does not have \(it has .*CPUExecutionProvider"):
            providers("cuda:0")
    with pytest.raises(SlimkitError, match="ONNX Runtime devices are cpu, cuda, tensorrt, openvino"):
        providers("npu")
