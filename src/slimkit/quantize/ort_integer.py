"""Static int8 written as ONNX Runtime's integer kernels, for fused transformer graphs.

ONNX Runtime's QDQ quantizer has no form for its fused ``Attention`` node, so in a
fused encoder the query/key/value projections would stay float. This pass writes the
kernels directly instead: ``QAttention`` for each fused attention node and
``MatMulIntegerToFloat`` (its bias folded in) for each weighted MatMul, each fed by a
``QuantizeLinear`` with the scale calibrated on the train split. Layer outputs stay
float, and so do the residual stream and layer norms: only the inputs of the layers
with weights are rounded, which is where int8 pays.

Smoothing (SmoothQuant, Xiao et al. 2023, https://arxiv.org/abs/2211.10438) moves the
outlier channels of a layer's input into its weights: input channel ``c`` is divided by
``alpha_c = max|x_c|^s / max|W_c|^(1-s)`` and weight row ``c`` multiplied by it, which
leaves the float result unchanged and lets one int8 scale fit the whole input. The
division is a ``Mul`` before the quantizer, except after a fused attention node, where
it is folded into the value projection (attention is linear in the values).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from slimkit.errors import ConfigError

MS_DOMAIN = "com.microsoft"
# What this pass writes integer kernels for: weighted MatMul and fused attention.
INTEGER_OPS = ("MatMul", "Attention")
_TINY = 1e-5


def channel_ranges(proto: onnx.ModelProto, feeds: list[dict[str, np.ndarray]],
                   tensors: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-channel (last axis) minimum and maximum of ``tensors`` over the calibration ``feeds``."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    present = {o.name for o in probe.graph.output}
    probe.graph.output.extend(helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None)
                              for t in tensors if t not in present)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    inputs = {i.name for i in session.get_inputs()}
    outputs = [o.name for o in session.get_outputs()]
    lo: dict[str, np.ndarray] = {}
    hi: dict[str, np.ndarray] = {}
    for feed in feeds:
        values = dict(zip(outputs, session.run(None, {k: v for k, v in feed.items() if k in inputs}), strict=True))
        for t in tensors:
            rows = values[t].reshape(-1, values[t].shape[-1])
            lo[t] = np.minimum(lo[t], rows.min(0)) if t in lo else rows.min(0)
            hi[t] = np.maximum(hi[t], rows.max(0)) if t in hi else rows.max(0)
    return {t: (lo[t], hi[t]) for t in tensors}


def integer_nodes(graph: onnx.GraphProto, names: set[str]) -> list[onnx.NodeProto]:
    """The nodes among ``names`` this pass quantizes: MatMul and Attention with a 2-D weight
    initializer (an Attention with unequal query/key/value widths has no int8 kernel).

    Raises:
        ConfigError: a chosen Conv or Gemm, which this form has no kernel for.
    """
    weights = {t.name: t for t in graph.initializer}
    other = sorted((n.name, n.op_type) for n in graph.node if n.name in names and n.op_type in ("Conv", "Gemm"))
    if other:
        raise ConfigError(f"form 'integer' quantizes MatMul and fused Attention only; node {other[0][0]!r} is a "
                          f"{other[0][1]}: use form 'qdq' for this graph, or leave the layer out with layers.ignore")
    return [n for n in graph.node if n.name in names and n.op_type in INTEGER_OPS and len(n.input) > 1
            and n.input[1] in weights and len(weights[n.input[1]].dims) == 2
            and not any(a.name == "qkv_hidden_sizes" for a in n.attribute)]


def smooth_(proto: onnx.ModelProto, nodes: list[onnx.NodeProto], ranges: dict[str, tuple[np.ndarray, np.ndarray]],
            strength: float, min_spread: float = 0.0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Move the input outliers of ``nodes`` into their weights; the float graph computes the same.

    A node whose input channels' largest magnitude is under ``min_spread`` times their
    median is left alone when smoothing it would cost a ``Mul`` (it has few outliers to
    move); after a fused attention node smoothing is free and always done.

    Returns the per-channel ranges of each node's (new) input tensor.
    """
    graph = proto.graph
    weights = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    readers: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    muls: dict[int, onnx.NodeProto] = {}
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for node in nodes:
        x = node.input[0]
        lo, hi = ranges[x]
        source = producer.get(x)
        free = (source is not None and source.op_type == "Attention" and readers[x] == 1 and source.input[2] in weights
                and not any(a.name == "qkv_hidden_sizes" for a in source.attribute))
        magnitude = np.maximum(np.maximum(-lo, hi), _TINY)
        few_outliers = float(magnitude.max() / np.median(magnitude)) < min_spread
        # A weight another node reads too cannot absorb this input's scales.
        if readers[node.input[1]] > 1 or (few_outliers and not free):
            out[x] = (lo, hi)
            continue
        w = numpy_helper.to_array(weights[node.input[1]]).astype(np.float32)
        alpha = (magnitude ** strength / np.maximum(np.abs(w).max(axis=1), _TINY) ** (1 - strength)).astype(np.float32)
        _set(weights, node.input[1], w * alpha[:, None])
        if free:
            # The attention output is a weighted sum of the values: scale the values instead.
            qkv = numpy_helper.to_array(weights[source.input[1]]).astype(np.float32)
            bias = numpy_helper.to_array(weights[source.input[2]]).astype(np.float32)
            v = slice(2 * qkv.shape[1] // 3, None)
            qkv[:, v] /= alpha
            bias[v] /= alpha
            _set(weights, source.input[1], qkv)
            _set(weights, source.input[2], bias)
        else:
            factor, smoothed = f"{node.name}/smoothing", f"{x}/{node.name}.smoothed"
            graph.initializer.append(numpy_helper.from_array((1.0 / alpha).astype(np.float32), factor))
            muls[id(node)] = helper.make_node("Mul", [x, factor], [smoothed], name=f"{node.name}/smooth")
            node.input[0] = smoothed
        out[node.input[0]] = (lo / alpha, hi / alpha)
    if muls:
        _insert_before(graph, muls)
    return out


def write_integer_(proto: onnx.ModelProto, nodes: list[onnx.NodeProto],
                   ranges: dict[str, tuple[np.ndarray, np.ndarray]], per_channel: bool = True) -> None:
    """Replace ``nodes`` by ONNX Runtime's int8 kernels with inputs quantized on ``ranges``."""
    graph = proto.graph
    weights = {t.name: t for t in graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    replaced: dict[int, list[onnx.NodeProto]] = {}
    dropped: set[int] = set()
    for node in nodes:
        lo, hi = ranges[node.input[0]]
        low, high = min(float(lo.min()), 0.0), max(float(hi.max()), 0.0)
        scale = (high - low) / 255.0 or 1.0
        zero = int(np.clip(round(-low / scale), 0, 255))
        w = numpy_helper.to_array(weights[node.input[1]]).astype(np.float32)
        w_amax = np.abs(w).max(axis=0) if per_channel else np.array(np.abs(w).max())
        w_scale = (np.maximum(w_amax, 1e-12) / 127.0).astype(np.float32)
        w_q = np.clip(np.round(w / w_scale), -127, 127).astype(np.int8)
        name = node.name
        graph.initializer.extend([
            numpy_helper.from_array(np.array(scale, np.float32), f"{name}/input_scale"),
            numpy_helper.from_array(np.array(zero, np.uint8), f"{name}/input_zero_point"),
            numpy_helper.from_array(w_q, f"{name}/weight_int8"),
            numpy_helper.from_array(w_scale, f"{name}/weight_scale"),
            numpy_helper.from_array(np.zeros(w_scale.shape, np.int8), f"{name}/weight_zero_point"),
        ])
        x_q = f"{node.input[0]}/{name}.int8"
        quantize = helper.make_node("QuantizeLinear", [node.input[0], f"{name}/input_scale", f"{name}/input_zero_point"],
                                    [x_q], name=f"{name}/quantize_input")
        if node.op_type == "MatMul":
            bias, output = "", node.output[0]
            after = readers.get(node.output[0], [])
            if len(after) == 1 and after[0].op_type == "Add" and _vector_bias(after[0], weights, w.shape[1]):
                bias = next(i for i in after[0].input if i in weights)
                output = after[0].output[0]
                dropped.add(id(after[0]))
            kernel = helper.make_node(
                "MatMulIntegerToFloat", [x_q, f"{name}/weight_int8", f"{name}/input_scale", f"{name}/weight_scale",
                                         f"{name}/input_zero_point", f"{name}/weight_zero_point", bias],
                [output], name=f"{name}_int8", domain=MS_DOMAIN)
        else:
            mask = node.input[3] if len(node.input) > 3 else ""
            inputs = [x_q, f"{name}/weight_int8", node.input[2], f"{name}/input_scale", f"{name}/weight_scale", mask,
                      f"{name}/input_zero_point", f"{name}/weight_zero_point"]
            kernel = helper.make_node("QAttention", inputs, list(node.output), name=f"Q{name}", domain=MS_DOMAIN)
            kernel.attribute.extend(node.attribute)
        replaced[id(node)] = [quantize, kernel]
    kept = []
    for n in graph.node:
        if id(n) not in dropped:
            kept.extend(replaced.get(id(n), [n]))
    del graph.node[:]
    graph.node.extend(kept)
    _drop_unused_weights(graph)
    if not any(o.domain == MS_DOMAIN for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


def quantize_integer(proto: onnx.ModelProto, names: set[str], calibration: list[dict[str, np.ndarray]],
                     strength: float, per_channel: bool = True, min_spread: float = 0.0) -> list[str]:
    """Static int8 of the chosen MatMul/Attention nodes of ``proto`` (weights loaded), in place.

    Returns the names of the nodes that were quantized.
    """
    nodes = integer_nodes(proto.graph, names)
    ranges = channel_ranges(proto, calibration, sorted({n.input[0] for n in nodes}))
    # MatMuls first: smoothing one that follows a fused attention node rescales that
    # node's value weights, which must happen before those weights are rounded.
    nodes.sort(key=lambda n: n.op_type != "MatMul")
    inputs = (smooth_(proto, nodes, ranges, strength, min_spread) if strength
              else {n.input[0]: ranges[n.input[0]] for n in nodes})
    # Inserting the smoothing nodes rebuilt the node list: find the chosen nodes again.
    current = {n.name: n for n in proto.graph.node}
    nodes = [current[n.name] for n in nodes]
    write_integer_(proto, nodes, inputs, per_channel)
    return [n.name for n in nodes]


def _vector_bias(add: onnx.NodeProto, weights: dict[str, Any], width: int) -> bool:
    consts = [i for i in add.input if i in weights]
    return len(consts) == 1 and list(weights[consts[0]].dims) == [width]


def _set(weights: dict[str, onnx.TensorProto], name: str, value: np.ndarray) -> None:
    weights[name].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))


def _insert_before(graph: onnx.GraphProto, before: dict[int, onnx.NodeProto]) -> None:
    nodes = []
    for n in graph.node:
        if id(n) in before:
            nodes.append(before[id(n)])
        nodes.append(n)
    del graph.node[:]
    graph.node.extend(nodes)


def _drop_unused_weights(graph: onnx.GraphProto) -> None:
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
