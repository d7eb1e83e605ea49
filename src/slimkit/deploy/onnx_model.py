"""An exported model: an ONNX file with the description needed to rebuild and feed it."""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class OnnxModel:
    """An ONNX file that slimkit stages (ONNX Runtime quantization) change in place.

    Attributes:
        path: the current ``.onnx`` file (self-contained, no external data).
        spec: the architecture description of the model it was exported from.
        tokenizer: the text model's tokenizer, if any.
        max_seq_len: the longest sequence the model accepts.
        workdir: where stages write new versions of the file.
    """

    path: Path
    spec: dict[str, Any]
    tokenizer: Any = None
    max_seq_len: int | None = None
    workdir: Path | None = None
    _slimkit_transforms: list[dict[str, Any]] = field(default_factory=list)

    def next_path(self, tag: str) -> Path:
        workdir = self.workdir or self.path.parent
        return workdir / f"{self.path.stem.split('.')[0]}.{tag}.onnx"

    def save(self, dest: Path) -> None:
        from slimkit.atomic import write_with

        write_with(dest, lambda tmp: shutil.copyfile(self.path, tmp))


_FUSED = {
    # ONNX Runtime's transformer optimizer numbers fused nodes by layer in graph order.
    "Attention": "backbone.encoder.layer.{}.attention.self",
    "EmbedLayerNormalization": "backbone.embeddings",
}


def node_layer_name(node_name: str, op_type: str) -> str:
    """The PyTorch qualified name of the layer an exported node came from.

    The exporter scopes node names by module path (``/backbone/encoder/layer.0/output/dense/MatMul``);
    a child of a container repeats the container's name (``/stem/stem.0/Conv`` is ``stem.0``,
    ``/features/features.1/conv/conv.0/conv.0.0/Conv`` is ``features.1.conv.0.0``). Fused
    nodes are named ``Attention_3``, which maps to the layer with that index.
    """
    if node_name.startswith("/"):
        parts: list[str] = []
        for scope in node_name.strip("/").split("/")[:-1]:
            words = scope.split(".")
            # The longest head of this scope that the path already ends with is repeated.
            k = next((k for k in range(len(words) - 1, 0, -1) if parts[-k:] == words[:k] and len(parts) >= k), 0)
            parts += words[k:]
        return ".".join(parts)
    m = re.fullmatch(r"([A-Za-z]+)_(\d+)", node_name)
    if m and m.group(1) in _FUSED:
        return _FUSED[m.group(1)].format(m.group(2))
    return node_name
