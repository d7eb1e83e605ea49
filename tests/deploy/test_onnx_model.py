"""OnnxModel bookkeeping and mapping exported node names back to PyTorch layer names."""

from __future__ import annotations

from pathlib import Path

import pytest

from slimkit.deploy.onnx_model import OnnxModel, node_layer_name


@pytest.mark.parametrize(
    ("node", "op", "layer"),
    [
        ("/backbone/encoder/layer.0/output/dense/MatMul", "MatMul", "backbone.encoder.layer.0.output.dense"),
        ("/backbone/encoder/layer.11/attention/self/query/MatMul", "MatMul", "backbone.encoder.layer.11.attention.self.query"),
        ("/backbone/embeddings/word_embeddings/Gather", "Gather", "backbone.embeddings.word_embeddings"),
        ("/0/Gemm", "Gemm", "0"),
        ("/encoder/1/2/MatMul", "MatMul", "encoder.1.2"),
        # Children of nn.Sequential repeat their container's name in the scope.
        ("/stem/stem.0/Conv", "Conv", "stem.0"),
        ("/features/features.1/conv/conv.0/conv.0.0/Conv", "Conv", "features.1.conv.0.0"),
        ("/classifier/classifier.1/Gemm", "Gemm", "classifier.1"),
        ("Attention_3", "Attention", "backbone.encoder.layer.3.attention.self"),
        ("Attention_0", "Attention", "backbone.encoder.layer.0.attention.self"),
        ("Attention_11", "Attention", "backbone.encoder.layer.11.attention.self"),
        ("EmbedLayerNormalization_0", "EmbedLayerNormalization", "backbone.embeddings"),
        # Names that are neither scoped nor fused pass through unchanged.
        ("MatMul_12", "MatMul", "MatMul_12"),
        ("SkipLayerNorm_3", "SkipLayerNormalization", "SkipLayerNorm_3"),
        ("my_node", "Gemm", "my_node"),
        ("Attention_x", "Attention", "Attention_x"),
    ],
)
def test_node_layer_name(node, op, layer):
    assert node_layer_name(node, op) == layer


def test_next_path_uses_the_workdir_and_the_stem(tmp_path):
    m = OnnxModel(tmp_path / "src" / "model.export.onnx", {}, workdir=tmp_path / "work")
    assert m.next_path("int8") == tmp_path / "work" / "model.int8.onnx"
    m.path = m.next_path("int8")
    assert m.next_path("qdq") == tmp_path / "work" / "model.qdq.onnx"


def test_next_path_without_workdir_is_beside_the_file():
    m = OnnxModel(Path("/models/enc.fused.onnx"), {})
    assert m.next_path("int8") == Path("/models/enc.int8.onnx")


def test_save_copies_the_file_atomically(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    src = tmp_path / "a.onnx"
    onnx.save(helper.make_model(graph), str(src))
    m = OnnxModel(src, {"kind": "callable", "ref": "x:y"})
    dest = tmp_path / "out" / "model.onnx"
    dest.parent.mkdir()
    m.save(dest)
    assert dest.read_bytes() == src.read_bytes()
    assert sorted(p.name for p in dest.parent.iterdir()) == ["model.onnx"]


def test_transforms_are_per_instance():
    a, b = OnnxModel(Path("a.onnx"), {}), OnnxModel(Path("b.onnx"), {})
    a._slimkit_transforms.append({"x": 1})
    assert b._slimkit_transforms == []
