"""fp16 through ONNX Runtime: an exported model's weights and arithmetic in float16."""

from __future__ import annotations

from typing import Any

import onnx
from pydantic import Field

from slimkit.config import LayerSelector, SlimConfig
from slimkit.deploy.onnx_model import node_layer_name
from slimkit.layers import select_names
from slimkit.quantize.ort import _check_onnx, _external, _quiet, _save
from slimkit.registry import register


class OrtFp16Config(SlimConfig):
    """ONNX Runtime float16: half the weights' bytes, and half-precision arithmetic on the
    devices that have it (GPUs, NPUs, ARM cores with FP16); the model's inputs and outputs
    stay float32, so callers feed it as before.

    Attributes:
        layers: layers by their PyTorch qualified names; ``ignore`` keeps them in float32
            (a layer whose values overflow float16's range of 65504, say).
    """

    kind = "quantize"
    method = "ort_fp16"
    layers: LayerSelector = Field(default_factory=LayerSelector)


@register(OrtFp16Config)
def _fp16(model: Any, config: OrtFp16Config, **_) -> list[str]:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = _check_onnx(model, config)
    external = _external(onnx.load(str(model.path), load_external_data=False).graph)
    proto = onnx.load(str(model.path))
    named = [n for n in proto.graph.node if n.name]
    layer_of = {n.name: node_layer_name(n.name, n.op_type) for n in named}
    chosen = set(select_names(sorted(set(layer_of.values())), config.layers))
    keep = [name for name, layer in layer_of.items() if layer not in chosen]
    with _quiet():
        half = convert_float_to_float16(proto, keep_io_types=True, node_block_list=keep)
    out = model.next_path("fp16")
    _save(half, out, external)
    model.path = out
    return sorted(chosen)
