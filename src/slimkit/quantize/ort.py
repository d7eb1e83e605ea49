"""int8 through ONNX Runtime: dynamic and static (QDQ) quantization of an exported model."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
from pydantic import Field

from slimkit.config import LayerSelector, SlimConfig
from slimkit.deploy.onnx_model import OnnxModel, node_layer_name
from slimkit.errors import ConfigError, DataError
from slimkit.layers import select_names
from slimkit.registry import register

QUANTIZABLE = ("MatMul", "Gemm", "Attention", "Gather", "EmbedLayerNormalization", "Conv")
# Static int8: the operators with weights, which layer selection chooses among, and the
# operators between them that ONNX Runtime also runs on int8 tensors (a Clip or Relu
# after a convolution is folded into its output range).
WEIGHTED_OPS = ("MatMul", "Gemm", "Conv")
BETWEEN_OPS = ("Add", "Mul", "Clip", "Relu", "AveragePool", "GlobalAveragePool", "MaxPool", "Concat", "Flatten",
               "Reshape", "Squeeze", "Unsqueeze", "Resize", "Pad", "Sigmoid", "Split", "Transpose")


class OrtDynamicInt8Config(SlimConfig):
    """ONNX Runtime dynamic int8: int8 weights, activations quantized at run time.

    Attributes:
        per_channel: one weight scale per output channel. Same speed as per-tensor and
            far more faithful on transformers (ORT's default is per-tensor).
        quantize_embeddings: store the embedding tables in int8 too (most of a small
            encoder's file).
        layers: layers by their PyTorch qualified names; ``ignore`` keeps them in fp32.
        fallback_layers: also keep in fp32 the N Linear layers whose quantization moves
            the output most, scored on the PyTorch model before export with calibration
            data from the train split (a fused attention node stays fp32 if any of its
            query/key/value projections is chosen).
        fallback_samples: how many calibration inputs score each layer for
            ``fallback_layers`` (one forward pass per input and layer).
    """

    kind = "quantize"
    method = "ort_dynamic_int8"
    per_channel: bool = True
    quantize_embeddings: bool = True
    layers: LayerSelector = Field(default_factory=LayerSelector)
    fallback_layers: int = Field(0, ge=0)
    fallback_samples: int = Field(32, ge=1)


class OrtStaticInt8Config(SlimConfig):
    """ONNX Runtime static int8 in QDQ format, with activation ranges from calibration
    or from quantization-aware training.

    Attributes:
        calibration_samples: how many train-split examples calibrate activation ranges.
        calibrate_method: how ranges are chosen from the observed values.
        activation_ranges: where each layer's input range comes from. ``auto``: the range
            trained by quantization-aware training where the PyTorch model the ONNX one
            was exported from records one (``convert_qat_(model, "onnxruntime")`` does),
            calibration for the other layers. ``calibrate``: calibration for every layer.
            ``trained``: trained ranges for every chosen layer (an error names any
            without one); no calibration data is needed. Trained ranges are used exactly
            (their scale and zero point), and layer outputs are then not re-quantized, as
            the fake-quantized model did not round them.
        ops: which operators compute in int8. ``weighted``: the layers with weights
            (MatMul, Gemm, Conv) only. ``all``: also the operators between them (residual
            adds, activations such as ReLU6's Clip, pooling, reshapes), so that a CNN's
            activations stay int8 from layer to layer instead of being dequantized and
            quantized again around every one; on MobileNetV2 under ONNX Runtime's CPU
            provider that halves the int8 latency. ``auto``: ``all`` for graphs with
            convolutions, ``weighted`` otherwise (transformer encoders).
        form: how the int8 graph is written. ``qdq``: QuantizeLinear/DequantizeLinear
            pairs around standard operators, the portable form that TensorRT and NPU or
            FPGA toolchains read (ONNX Runtime fuses the pairs when it loads the file).
            ``integer``: ONNX Runtime's int8 kernels written directly
            (:mod:`slimkit.quantize.ort_integer`): ``QAttention`` for fused attention
            nodes, which QDQ has no form for, and ``MatMulIntegerToFloat`` with its bias;
            minmax ranges per channel; MatMul and Attention only. ``auto``: ``integer`` for
            a graph with fused attention nodes (already specific to ONNX Runtime) and no
            trained ranges, ``qdq`` otherwise.
        quantize_embeddings: in form ``integer``, also store the fused embedding layer's
            tables in int8 (a lookup has no activation to calibrate; most of a small
            encoder's file and of its serving process's memory).
        symmetric_activations: in form ``qdq``, int8 activations with zero point 0
            instead of uint8 with a calibrated zero point: what TensorRT's explicit
            quantization accepts.
        smoothing: SmoothQuant migration strength in [0, 1] for form ``integer``: how much
            of each input channel's outlier range moves into the weights (0: none). Unset:
            0.8 for form ``integer``, 0 for ``qdq``.
        smoothing_min_spread: smooth a layer only where its input channels' largest
            magnitude is at least this many times their median (where the outliers are),
            as each smoothed input costs an elementwise ``Mul``; 0 smooths every layer.
            After a fused attention node smoothing is free and always done.
        fallback_layers: keep in fp32 the N Linear layers whose quantization moves the
            output most, scored on the PyTorch model before export with train-split
            calibration inputs (as ``ort_dynamic_int8``'s).
        fallback_samples: how many calibration inputs score each layer for ``fallback_layers``.
    """

    kind = "quantize"
    method = "ort_static_int8"
    per_channel: bool = True
    calibration_samples: int = Field(128, ge=1)
    calibrate_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    activation_ranges: Literal["auto", "calibrate", "trained"] = "auto"
    layers: LayerSelector = Field(default_factory=LayerSelector)
    ops: Literal["auto", "weighted", "all"] = "auto"
    form: Literal["auto", "qdq", "integer"] = "auto"
    smoothing: float | None = Field(None, ge=0.0, le=1.0)
    smoothing_min_spread: float = Field(8.0, ge=0.0)
    quantize_embeddings: bool = True
    symmetric_activations: bool = False
    fallback_layers: int = Field(0, ge=0)
    fallback_samples: int = Field(32, ge=1)


def _check_onnx(model: Any, config: SlimConfig) -> OnnxModel:
    if not isinstance(model, OnnxModel):
        raise ConfigError(
            f"method {config.method!r} quantizes an ONNX model; add an `export` stage before it "
            "(or use dynamic_int8 for a PyTorch model)"
        )
    return model


def _choose_nodes(graph: onnx.GraphProto, selector: LayerSelector, op_types: Iterable[str]) -> tuple[list[str], list[str]]:
    """Names of the nodes to leave in float, and the layer names chosen for quantization."""
    nodes = [n for n in graph.node if n.op_type in op_types]
    layer_of = {n.name: node_layer_name(n.name, n.op_type) for n in nodes}
    chosen = set(select_names(sorted(set(layer_of.values())), selector))
    keep = [name for name, layer in layer_of.items() if layer not in chosen]
    # The dynamic quantizer turns each Gemm into a MatMul named NAME_MatMul before it
    # applies the exclusion list, so both names must be excluded.
    keep += [f"{n.name}_MatMul" for n in nodes if n.op_type == "Gemm" and n.name in keep]
    return keep, sorted(chosen)


@register(OrtDynamicInt8Config)
def _dynamic(model: Any, config: OrtDynamicInt8Config, calibration=None, source=None, **_) -> list[str]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = _check_onnx(model, config)
    ops = [o for o in QUANTIZABLE if config.quantize_embeddings or o not in ("Gather", "EmbedLayerNormalization")]
    graph = onnx.load(str(model.path), load_external_data=False).graph
    selector = config.layers
    if config.fallback_layers:
        selector = _with_fallback(graph, selector, ops, config, calibration, source)
    keep, layers = _choose_nodes(graph, selector, ops)
    out = model.next_path("int8")
    with _quiet():
        quantize_dynamic(
            str(model.path), str(out), weight_type=QuantType.QInt8, per_channel=config.per_channel,
            op_types_to_quantize=ops, nodes_to_exclude=keep,
            # Fused contrib ops (Attention, SkipLayerNormalization) carry no type information
            # for their outputs; telling the quantizer they are float lets it quantize them.
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
            use_external_data_format=_external(graph),
        )
    model.path = out
    return layers


def _with_fallback(graph, selector: LayerSelector, ops, config, calibration, source) -> LayerSelector:
    """``selector`` plus the most sensitive layers in ``ignore``, scored on the PyTorch model."""
    from torch import nn

    from slimkit.quantize.sensitivity import linear_sensitivity, most_sensitive

    if source is None:
        raise ConfigError(
            "fallback_layers scores layers on the PyTorch model before export; call it through a "
            "recipe (or pass source=<the LoadedModel>), or name the layers in layers.ignore"
        )
    onnx_layers = {node_layer_name(n.name, n.op_type) for n in graph.node if n.op_type in ops}
    linears = [n for n, m in source.module.named_modules() if isinstance(m, nn.Linear)]
    candidates = [n for n in linears if n in onnx_layers or n.rsplit(".", 1)[0] in onnx_layers]
    scores = linear_sensitivity(source.module, candidates, calibration or [], config.per_channel,
                                config.fallback_samples)
    ignore = list(selector.ignore)
    for name in most_sensitive(scores, config.fallback_layers):
        ignore.append(name if name in onnx_layers else name.rsplit(".", 1)[0])
    return selector.model_copy(update={"ignore": sorted(set(ignore))})


@register(OrtStaticInt8Config)
def _static(model: Any, config: OrtStaticInt8Config, calibration: list[dict[str, np.ndarray]] | None = None,
            source: Any = None, **_) -> list[str]:
    model = _check_onnx(model, config)
    # The graph is enough to choose nodes; the weights are read only to rewrite them.
    proto = onnx.load(str(model.path), load_external_data=False)
    trained = {} if config.activation_ranges == "calibrate" else _trained_ranges(source, config)
    fused = any(n.op_type == "Attention" for n in proto.graph.node)
    form = config.form if config.form != "auto" else ("integer" if fused and not trained else "qdq")
    smoothing = config.smoothing if config.smoothing is not None else (0.8 if form == "integer" else 0.0)
    if form == "qdq" and smoothing:
        raise ConfigError(f"smoothing={smoothing} is applied by form 'integer'; set form: integer, or leave "
                          "smoothing unset for the QDQ form")
    if form == "integer" and config.symmetric_activations:
        raise ConfigError("symmetric_activations is a setting of form 'qdq' (for TensorRT); set form: qdq")
    if form == "integer" and config.calibrate_method != "minmax":
        raise ConfigError(f"calibrate_method={config.calibrate_method!r}: form 'integer' calibrates by minmax per "
                          "channel; use form: qdq for percentile or entropy calibration")
    if form == "integer" and trained and config.activation_ranges == "trained":
        raise ConfigError("activation_ranges='trained' writes the trained ranges in QDQ form; set form: qdq")
    ops = list(WEIGHTED_OPS) + (["Attention"] if form == "integer" else [])
    selector = config.layers
    if config.fallback_layers:
        selector = _with_fallback(proto.graph, selector, ops, config, calibration, source)
    keep, layers = _choose_nodes(proto.graph, selector, ops)
    if form == "integer":
        calibration = _calibration(calibration, config.calibration_samples, layers)
        op_of = {n.name: n.op_type for n in proto.graph.node}
        done = _integer(model, proto, keep, calibration, smoothing, config)
        # An attention node with unequal query/key/value widths has no int8 kernel and stays float.
        layers = sorted({node_layer_name(name, op_of[name]) for name in done})
    else:
        _qdq(model, proto, config, keep, layers, trained, calibration)
    return layers


def _calibration(calibration: list[dict[str, np.ndarray]] | None, samples: int, layers: list[str],
                 trained: dict[str, Any] | None = None) -> list[dict[str, np.ndarray]]:
    """The calibration inputs to use, checked: refused when absent, fewer than asked for, or not finite."""
    calibrated = [layer for layer in layers if layer not in (trained or {})]
    if calibrated and not calibration:
        raise DataError(
            "static quantization needs calibration data from the train split; none was given"
            + (f" (layers without a trained range: {', '.join(calibrated[:4])})" if trained else "")
        )
    if calibrated and len(calibration) < samples:
        raise DataError(
            f"static quantization asked for calibration_samples={samples} train-split examples but got "
            f"{len(calibration)}: ranges from so few would not cover the inputs it will see; use a larger train "
            f"split, or lower calibration_samples to {len(calibration)} or fewer knowingly"
        )
    if calibration:
        check_finite(calibration)
    return calibration[:samples] if calibration else []


def _integer(model: OnnxModel, proto: onnx.ModelProto, keep: list[str], calibration: list[dict[str, np.ndarray]],
             smoothing: float, config: OrtStaticInt8Config) -> list[str]:
    """Write the integer form; the names of the nodes quantized."""
    from slimkit.quantize.ort_integer import quantize_integer

    external = _external(proto.graph)
    _load_weights(proto, model.path)
    names = {n.name for n in proto.graph.node} - set(keep)
    done = quantize_integer(proto, names, calibration, smoothing, config.per_channel, config.smoothing_min_spread)
    embeddings = [n for n in proto.graph.node if n.op_type == "EmbedLayerNormalization"]
    for node in embeddings:
        _own_weights(proto.graph, node)
    out = model.next_path("int8")
    if not (config.quantize_embeddings and embeddings):
        _save(proto, out, external)
    else:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        kernels = model.next_path("integer")
        _save(proto, kernels, external)
        # Weight-only: ONNX Runtime's quantizer writes QEmbedLayerNormalization with int8 tables.
        with _quiet():
            quantize_dynamic(str(kernels), str(out), weight_type=QuantType.QUInt8,
                             op_types_to_quantize=["EmbedLayerNormalization"],
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
                             use_external_data_format=external)
    model.path = out
    return done


def _qdq(model: OnnxModel, proto: onnx.ModelProto, config: OrtStaticInt8Config, keep: list[str], layers: list[str],
         trained: dict[str, Any], calibration: list[dict[str, np.ndarray]] | None) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    ops = list(WEIGHTED_OPS)
    # With trained ranges the operators between layers would have no range but calibration's.
    convolutional = any(n.op_type == "Conv" for n in proto.graph.node)
    between = config.ops == "all" or (config.ops == "auto" and convolutional and not trained)
    quantized_ops = ops + list(BETWEEN_OPS) if between else ops
    if config.activation_ranges == "trained":
        missing = [layer for layer in layers if layer not in trained]
        if missing:
            raise ConfigError([
                f"layer {layer!r} has no trained input range; leave it out with layers.ignore, or use "
                "activation_ranges='auto' to calibrate it" for layer in missing
            ])
    # With every range trained, ONNX Runtime still runs its calibration pass; one
    # all-zeros input serves, as no calibrated range is used.
    feeds = _calibration(calibration, config.calibration_samples, layers, trained) or [_zeros_feed(proto.graph)]
    if config.calibrate_method != "minmax":
        feeds = same_shape(feeds)  # the histogram methods stack every batch's values
    graph_inputs = {i.name for i in proto.graph.input}

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter([{k: v for k, v in f.items() if k in graph_inputs} for f in feeds])

        def get_next(self):
            return next(self._it, None)

    extra: dict[str, Any] = {"DefaultTensorType": onnx.TensorProto.FLOAT}
    src, external = model.path, _external(proto.graph)
    overrides = _use_trained_ranges(proto.graph, {k: v for k, v in trained.items() if k in layers}, ops)
    fused_ops = any(n.domain == "com.microsoft" for n in proto.graph.node)
    if overrides or fused_ops:
        src = model.next_path("ranges")
        _load_weights(proto, model.path)
        if fused_ops:
            # The calibrator only sees tensors whose type is known, and ONNX's shape
            # inference does not know ONNX Runtime's fused operators: without this the
            # layers after them would be left with float inputs.
            from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

            proto = SymbolicShapeInference.infer_shapes(proto, auto_merge=True)
        _save(proto, src, external)
    if overrides:
        extra.update({
            "TensorQuantOverrides": overrides,
            # The fake-quantized layers did not round their outputs; neither may the deployed ones.
            "OpTypesToExcludeOutputQuantization": ops,
            # Keep the weight grid the layers trained on even where the bias's int32 grid
            # (input scale x weight scale) is too fine for it: the bias is then clipped, as
            # the fake-quantized layers clip it, instead of the weights being rescaled.
            "QDQDisableWeightAdjustForInt32Bias": True,
        })
    elif not between:
        # A layer's output that only float operators read is not rounded (they would
        # dequantize it at once); ONNX Runtime then runs the layer as MatMulIntegerToFloat.
        extra["OpTypesToExcludeOutputQuantization"] = ops
    if config.symmetric_activations:
        extra["ActivationSymmetric"] = True
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[config.calibrate_method]
    out = model.next_path("qdq")
    with _quiet():
        quantize_static(
            str(src), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=config.per_channel,
            activation_type=QuantType.QInt8 if config.symmetric_activations else QuantType.QUInt8,
            weight_type=QuantType.QInt8, op_types_to_quantize=quantized_ops,
            nodes_to_exclude=keep, calibrate_method=method, extra_options=extra,
            use_external_data_format=external,
        )
    qdq = onnx.load(str(out), load_external_data=False)
    if float_readers_read_float(qdq.graph, set(quantized_ops)):
        onnx.save(qdq, str(out))  # the weights, external or not, are where they were
    model.path = out


def float_readers_read_float(graph: onnx.GraphProto, quantized_ops: set[str]) -> int:
    """Let the float operators that read a quantized tensor made by a float operator (a
    residual add reading a layer norm's output that also feeds a quantized layer) read
    the unrounded value.

    The quantizer gives a tensor one QuantizeLinear/DequantizeLinear pair that every
    reader shares; only the quantized operators need the rounded value. Returns how many
    inputs were rewired.
    """
    producer = {o: n for n in graph.node for o in n.output}
    rewired = 0
    for node in graph.node:
        if node.op_type in quantized_ops or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for k, name in enumerate(node.input):
            dq = producer.get(name)
            q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            source = producer.get(q.input[0]) if q is not None and q.op_type == "QuantizeLinear" else None
            # The output of a quantized operator is left alone: ONNX Runtime computes it in
            # int8 only while every reader takes the rounded value.
            if q is not None and q.op_type == "QuantizeLinear" and (source is None or source.op_type not in quantized_ops):
                node.input[k] = q.input[0]
                rewired += 1
    return rewired


def same_shape(feeds: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Calibration inputs zero-padded to one shape per input (sentences of different
    lengths: zeros are the padding token and a masked position)."""
    if not feeds:
        return feeds
    longest = {k: np.max([np.shape(f[k]) for f in feeds], axis=0) for k in feeds[0]}
    return [{k: np.pad(np.asarray(v), [(0, int(m) - d) for d, m in zip(np.shape(v), longest[k], strict=True)])
             for k, v in f.items()} for f in feeds]


def _own_weights(graph: onnx.GraphProto, node: onnx.NodeProto) -> None:
    """Give ``node`` its own copy of each weight other nodes read too.

    The exporter stores equal constants once (a small model's layer norms all start with
    the same scale); quantizing the copy one node reads would round the others' too.
    """
    weights = {t.name: t for t in graph.initializer}
    readers: dict[str, int] = {}
    for n in graph.node:
        for i in set(n.input):
            readers[i] = readers.get(i, 0) + 1
    for k, name in enumerate(node.input):
        if name in weights and readers[name] > 1:
            copy = onnx.TensorProto()
            copy.CopyFrom(weights[name])
            copy.name = f"{name}/{node.name}"
            graph.initializer.append(copy)
            node.input[k] = copy.name


def _trained_ranges(source: Any, config: OrtStaticInt8Config) -> dict[str, dict[str, Any]]:
    """Input ranges recorded on the PyTorch model (``static_int8`` with target onnxruntime)."""
    from slimkit.quantize.api import transforms_of
    from slimkit.quantize.static_int8 import StaticInt8Config

    module = getattr(source, "module", source)
    if module is None:
        if config.activation_ranges == "trained":
            raise ConfigError(
                "activation_ranges='trained' reads the ranges from the PyTorch model the ONNX model was "
                "exported from; call it through a recipe, or pass source=<that model>"
            )
        return {}
    ranges: dict[str, dict[str, Any]] = {}
    for t in transforms_of(module):
        cfg = t["config"]
        if cfg["method"] == StaticInt8Config.method and cfg.get("target") == "onnxruntime":
            ranges.update({name: r for name, r in cfg["input_ranges"].items() if name in t["layers"]})
    return ranges


def _use_trained_ranges(graph: onnx.GraphProto, ranges: dict[str, dict[str, Any]], ops: list[str]) -> dict[str, Any]:
    """Give each layer with a trained range its own input tensor (through an Identity),
    and return ONNX Runtime's overrides for those tensors.

    Layers that read the same tensor (say, two heads on one feature vector) may have
    trained different ranges; a tensor can only carry one, hence one tensor per layer.
    """
    overrides: dict[str, Any] = {}
    nodes = []
    for node in graph.node:
        layer = node_layer_name(node.name, node.op_type)
        if node.op_type in ops and layer in ranges:
            tensor = f"{node.input[0]}/{layer}.input"
            nodes.append(onnx.helper.make_node("Identity", [node.input[0]], [tensor], name=f"{node.name}/input_range"))
            node = onnx.NodeProto.FromString(node.SerializeToString())
            node.input[0] = tensor
            r = ranges[layer]
            overrides[tensor] = [{"scale": np.array(r["scale"], dtype=np.float32),
                                  "zero_point": np.array(r["zero_point"], dtype=np.uint8)}]
        nodes.append(node)
    if overrides:
        del graph.node[:]
        graph.node.extend(nodes)
    return overrides


def _external(graph: onnx.GraphProto) -> bool:
    """Whether ``graph`` (loaded without its external data) keeps its weights in an external file."""
    from onnx.external_data_helper import uses_external_data

    return any(uses_external_data(t) for t in graph.initializer)


def _load_weights(proto: onnx.ModelProto, source: Path) -> None:
    """Load into ``proto``, read from ``source`` without its external data, its weights."""
    from onnx.external_data_helper import load_external_data_for_model

    load_external_data_for_model(proto, str(source.parent))


def _save(proto: onnx.ModelProto, dest: Path, external: bool) -> None:
    """Save ``proto`` with all its weights, in an external file ``<dest>.data`` if ``external``
    (a model over 2 GB must keep one: protobuf cannot hold it)."""
    if not external:
        onnx.save(proto, str(dest))
        return
    data = dest.with_name(f"{dest.name}.data")
    data.unlink(missing_ok=True)  # onnx appends to an existing file
    onnx.save(proto, str(dest), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name)


def _zeros_feed(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """One all-zeros input per graph input, unknown dimensions set to 1."""
    weights = {i.name for i in graph.initializer}
    feed = {}
    for i in graph.input:
        if i.name in weights:
            continue
        t = i.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else 1 for d in t.shape.dim]
        feed[i.name] = np.zeros(shape, dtype=onnx.helper.tensor_dtype_to_np_dtype(t.elem_type))
    return feed


def check_finite(batches: list[dict[str, np.ndarray]]) -> None:
    """Refuse calibration data holding NaN or inf, naming the batch and input."""
    for i, feed in enumerate(batches):
        for name, value in feed.items():
            arr = np.asarray(value)
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                raise DataError(
                    f"calibration batch {i}, input {name!r}: contains NaN or inf; clean the "
                    "calibration data (ranges computed from it would be meaningless)"
                )


@contextmanager
def _quiet():
    # The quantizer logs a pre-processing suggestion on the root logger at WARNING level
    # on every call; silence it for the call only, leaving the user's logging as it was.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)
