"""Static int8 of a fused transformer graph as ONNX Runtime's integer kernels."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from slimkit.deploy.export import ExportConfig, export
from slimkit.errors import ConfigError
from slimkit.quantize import OrtStaticInt8Config, quantize_
from slimkit.quantize.ort import float_readers_read_float, same_shape
from slimkit.quantize.ort_integer import channel_ranges, integer_nodes, smooth_


@pytest.fixture(scope="module")
def tiny_bert():
    """A seeded 2-layer BERT with MiniLM's tokenizer, and train-like sentences as feeds."""
    from transformers import BertConfig

    from slimkit.zoo.models import build_from_spec, load_model

    minilm = load_model("minilm-l6")
    config = BertConfig(vocab_size=minilm.tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64)
    spec = {**minilm.spec, "hf_config": {**config.to_diff_dict(), "model_type": "bert"}}
    torch.manual_seed(0)
    model = build_from_spec(spec, None)
    with torch.no_grad():  # an outlier channel in every layer norm's output, as trained BERTs have
        for name, p in model.module.named_parameters():
            if name.endswith("LayerNorm.weight"):
                p[3] = 30.0
    model.tokenizer, model.max_seq_len = minilm.tokenizer, 128
    texts = ["a gripping, beautifully shot film", "the plot never comes together", "an odd little movie",
             "funny and moving at once", "two hours I will not get back", "quietly devastating", "it is fine",
             "the cast is wonderful but the script is thin"]
    feeds = []
    for t in texts:
        ids = minilm.tokenizer(t, return_tensors="np")["input_ids"].astype(np.int64)
        feeds.append({"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)})
    return model, feeds


def fused(tiny_bert, tmp_path):
    return export(tiny_bert[0], ExportConfig(optimize="auto"), workdir=tmp_path)


def run(path, feeds) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return np.concatenate([session.run(None, {k: v for k, v in f.items() if k in names})[0] for f in feeds])


def cosine(a, b) -> np.ndarray:
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_fused_attention_and_matmuls_become_integer_kernels(tiny_bert, tmp_path):
    model = fused(tiny_bert, tmp_path)
    feeds = tiny_bert[1]
    ref = run(model.path, feeds)
    assert [n.op_type for n in onnx.load(str(model.path)).graph.node].count("Attention") == 2
    layers = quantize_(model, OrtStaticInt8Config(calibration_samples=8), calibration=feeds)
    ops = [n.op_type for n in onnx.load(str(model.path)).graph.node]
    # Two layers: QAttention each, and the attention output, FFN in and FFN out as
    # MatMulIntegerToFloat, the biases folded in (no Add after them but the residuals).
    assert ops.count("QAttention") == 2 and ops.count("MatMulIntegerToFloat") == 6
    assert "Attention" not in ops and "MatMul" not in ops and "DequantizeLinear" not in ops
    # The embedding tables are int8 too, and the layer norms sharing their (equal) weights are not.
    assert ops.count("QEmbedLayerNormalization") == 1 and ops.count("LayerNormalization") == 4
    assert len(layers) == 8 and "backbone.encoder.layer.1.attention.self" in layers
    out = run(model.path, feeds)
    assert out.shape == ref.shape == (8, 32)
    assert cosine(ref, out).min() >= 0.99  # seeded random weights: measured 0.998


def test_smoothing_leaves_the_float_graph_computing_the_same(tiny_bert, tmp_path):
    model = fused(tiny_bert, tmp_path)
    feeds = tiny_bert[1]
    proto = onnx.load(str(model.path))
    ref = run(model.path, feeds)
    nodes = integer_nodes(proto.graph, {n.name for n in proto.graph.node})
    ranges = channel_ranges(proto, feeds, sorted({n.input[0] for n in nodes}))
    nodes.sort(key=lambda n: n.op_type != "MatMul")
    smoothed = smooth_(proto, nodes, ranges, 0.8)
    ops = [n.op_type for n in proto.graph.node]
    # The attention output is smoothed through the value weights: 8 layers, 6 Muls.
    assert ops.count("Mul") - [n.op_type for n in onnx.load(str(model.path)).graph.node].count("Mul") == 6
    path = tmp_path / "smoothed.onnx"
    onnx.save(proto, str(path))
    np.testing.assert_allclose(run(path, feeds), ref, rtol=1e-4, atol=1e-5)
    # The smoothed inputs' ranges are the originals divided channel by channel.
    widest = max(float(np.maximum(-lo, hi).max() / np.maximum(-lo, hi).min()) for lo, hi in ranges.values())
    after = max(float(np.maximum(-lo, hi).max() / np.maximum(-lo, hi).min()) for lo, hi in smoothed.values())
    assert after < widest


def test_smoothing_raises_fidelity(tiny_bert, tmp_path):
    feeds = tiny_bert[1]
    found = {}
    for strength in (0.0, 0.8):
        model = fused(tiny_bert, tmp_path / str(strength))
        ref = run(model.path, feeds)
        quantize_(model, OrtStaticInt8Config(calibration_samples=8, smoothing=strength), calibration=feeds)
        out, ref = np.delete(run(model.path, feeds), 3, axis=1), np.delete(ref, 3, axis=1)  # but the outlier
        found[strength] = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
    assert found[0.8] < 0.8 * found[0.0]  # measured 0.68x


def test_integer_form_refuses_histogram_calibration_and_convolutions(tiny_bert, tmp_path):
    model = fused(tiny_bert, tmp_path)
    with pytest.raises(ConfigError, match="minmax per channel"):
        quantize_(model, OrtStaticInt8Config(calibration_samples=8, calibrate_method="entropy"), calibration=tiny_bert[1])
    with pytest.raises(ConfigError, match="form 'integer'"):
        quantize_(model, OrtStaticInt8Config(calibration_samples=8, form="qdq", smoothing=0.5), calibration=tiny_bert[1])


def test_qdq_form_of_a_fused_graph_quantizes_every_matmul_and_keeps_residuals_float(tiny_bert, tmp_path):
    model = fused(tiny_bert, tmp_path)
    feeds = tiny_bert[1]
    ref = run(model.path, feeds)
    quantize_(model, OrtStaticInt8Config(calibration_samples=8, form="qdq"), calibration=feeds)
    graph = onnx.load(str(model.path)).graph
    producer = {o: n for n in graph.node for o in n.output}
    matmuls = [n for n in graph.node if n.op_type == "MatMul"]
    # The layers after attention and GELU (fused operators) get their input quantized too.
    assert len(matmuls) == 6 and all(producer[m.input[0]].op_type == "DequantizeLinear" for m in matmuls)
    adds = [n for n in graph.node if n.op_type == "Add"]
    assert not any(producer.get(i) is not None and producer[i].op_type == "DequantizeLinear"
                   for a in adds for i in a.input)
    assert cosine(ref, run(model.path, feeds)).min() >= 0.99


def test_float_readers_keep_reading_quantized_operators_outputs():
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], name="ln"),
        helper.make_node("QuantizeLinear", ["y", "s", "z"], ["yq"], name="q"),
        helper.make_node("DequantizeLinear", ["yq", "s", "z"], ["yd"], name="dq"),
        helper.make_node("MatMul", ["yd", "w"], ["m"], name="mm"),
        helper.make_node("Add", ["yd", "m"], ["r"], name="residual"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, 4])])
    assert float_readers_read_float(graph, {"MatMul"}) == 1
    assert list(graph.node[4].input) == ["y", "m"] and list(graph.node[3].input) == ["yd", "w"]
    # When the producer is itself quantized (an Add in a CNN kept int8), it stays rounded.
    graph.node[4].input[0] = "yd"
    assert float_readers_read_float(graph, {"MatMul", "LayerNormalization"}) == 0


def test_same_shape_pads_sentences_to_the_longest():
    feeds = [{"input_ids": np.ones((1, 3), np.int64)}, {"input_ids": np.full((1, 5), 7, np.int64)}]
    padded = same_shape(feeds)
    assert [f["input_ids"].shape for f in padded] == [(1, 5), (1, 5)]
    assert padded[0]["input_ids"].tolist() == [[1, 1, 1, 0, 0]]


def test_static_int8_fallback_keeps_the_most_sensitive_layers_float(tiny_bert, tmp_path, monkeypatch):
    import slimkit.quantize.sensitivity as sensitivity

    model = fused(tiny_bert, tmp_path)
    scores = {}

    def fake(module, names, calibration, per_channel, samples):
        scores.update({n: (1.0 if n.endswith("layer.1.output.dense") else 0.0) for n in names})
        return scores

    monkeypatch.setattr(sensitivity, "linear_sensitivity", fake)
    layers = quantize_(model, OrtStaticInt8Config(calibration_samples=8, fallback_layers=1), calibration=tiny_bert[1], source=tiny_bert[0])
    assert "backbone.encoder.layer.1.output.dense" not in layers and len(layers) == 7
    ops = [n.op_type for n in onnx.load(str(model.path)).graph.node]
    assert ops.count("MatMulIntegerToFloat") == 5 and ops.count("MatMul") == 1


def test_symmetric_activations_are_int8_with_zero_point_zero(tiny_bert, tmp_path):
    from onnx import numpy_helper

    model = export(tiny_bert[0], ExportConfig(optimize="none"), workdir=tmp_path)
    feeds = tiny_bert[1]
    ref = run(model.path, feeds)
    quantize_(model, OrtStaticInt8Config(calibration_samples=8, symmetric_activations=True), calibration=feeds)
    graph = onnx.load(str(model.path)).graph
    weights = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    zero_points = [weights[n.input[2]] for n in graph.node if n.op_type == "QuantizeLinear"]
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)
    assert cosine(ref, run(model.path, feeds)).min() >= 0.98
    with pytest.raises(ConfigError, match="form 'qdq'"):
        quantize_(fused(tiny_bert, tmp_path / "f"), OrtStaticInt8Config(calibration_samples=8, symmetric_activations=True), calibration=feeds)


def test_integer_form_names_a_convolution_it_cannot_quantize(tmp_path):
    from tiny_models import tiny_classifier

    from slimkit.zoo.models import LoadedModel

    module, example = tiny_classifier()
    model = export(LoadedModel(module.eval(), {"kind": "callable", "ref": "tiny_models:tiny_classifier"},
                               example_inputs=example), ExportConfig(), workdir=tmp_path)
    calibration = [{"input_0": torch.rand(2, 3, 16, 16).numpy()} for _ in range(4)]
    with pytest.raises(ConfigError, match=r"node '/block/block.0/Conv' is a Conv: use form 'qdq'"):
        quantize_(model, OrtStaticInt8Config(form="integer", calibration_samples=4), calibration=calibration)


def test_an_attention_without_an_int8_kernel_stays_float_and_is_not_reported(tiny_bert, tmp_path):
    model = fused(tiny_bert, tmp_path)
    proto = onnx.load(str(model.path))
    node = next(n for n in proto.graph.node if n.op_type == "Attention")
    node.attribute.append(onnx.helper.make_attribute("qkv_hidden_sizes", [32, 32, 32]))  # QAttention has no such form
    onnx.save(proto, str(model.path))
    layers = quantize_(model, OrtStaticInt8Config(calibration_samples=8), calibration=tiny_bert[1])
    ops = [n.op_type for n in onnx.load(str(model.path)).graph.node]
    assert ops.count("Attention") == 1 and ops.count("QAttention") == 1
    assert "backbone.encoder.layer.0.attention.self" not in layers and len(layers) == 7


def test_smoothing_leaves_a_weight_two_layers_share_alone():
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 3)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"], name="first"),
             helper.make_node("MatMul", ["x2", "w"], ["b"], name="second")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 4]) for n in ("x", "x2")],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3]) for n in ("a", "b")],
                              [numpy_helper.from_array(w, "w")])
    proto = helper.make_model(graph)
    ranges = {"x": (np.full(4, -1.0), np.array([1.0, 50.0, 1.0, 1.0])), "x2": (np.full(4, -1.0), np.ones(4))}
    out = smooth_(proto, list(proto.graph.node), ranges, 0.8)
    assert [n.op_type for n in proto.graph.node] == ["MatMul", "MatMul"]  # no Mul inserted
    np.testing.assert_array_equal(numpy_helper.to_array(proto.graph.initializer[0]), w)
    assert out["x"][1][1] == 50.0


def test_smoothing_skips_inputs_without_outliers_unless_it_is_free(tiny_bert, tmp_path):
    model = fused(tiny_bert, tmp_path)
    feeds = tiny_bert[1]
    proto = onnx.load(str(model.path))
    before = [n.op_type for n in proto.graph.node].count("Mul")
    nodes = integer_nodes(proto.graph, {n.name for n in proto.graph.node})
    ranges = channel_ranges(proto, feeds, sorted({n.input[0] for n in nodes}))
    nodes.sort(key=lambda n: n.op_type != "MatMul")
    smoothed = smooth_(proto, nodes, ranges, 0.8, min_spread=1e6)
    assert [n.op_type for n in proto.graph.node].count("Mul") == before  # no Mul was worth it
    after_attention = [n for n in nodes if "attention/output" in n.name]
    assert len(after_attention) == 2 and all(
        not np.array_equal(smoothed[n.input[0]][1], ranges[n.input[0]][1]) for n in after_attention)
