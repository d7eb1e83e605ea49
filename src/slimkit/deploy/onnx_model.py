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
        path: the current ``.onnx`` file; a model over 2 GB (protobuf's limit) keeps its
            weights in one external-data file beside it, ``<name>.data``.
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
        """Copy the model to ``dest``, and its external-data file, if any, to ``<dest>.data``."""
        import onnx

        from slimkit.atomic import write_with

        proto = onnx.load(str(self.path), load_external_data=False)
        external = external_tensors(proto)
        if not external:
            write_with(dest, lambda tmp: shutil.copyfile(self.path, tmp))
            return
        if len(set(external.values())) > 1:
            one_data_file(self.path)
            proto = onnx.load(str(self.path), load_external_data=False)
            external = external_tensors(proto)
        data = dest.with_name(f"{dest.name}.data")
        source = self.path.parent / next(iter(external.values()))
        write_with(data, lambda tmp: shutil.copyfile(source, tmp))
        for t in proto.graph.initializer:
            for entry in t.external_data:
                if entry.key == "location":
                    entry.value = data.name
        write_with(dest, lambda tmp: onnx.save(proto, str(tmp)))


def external_tensors(proto: Any) -> dict[str, str]:
    """Initializer name -> the external-data file (relative to the model) it is stored in."""
    from onnx.external_data_helper import uses_external_data

    return {t.name: next(e.value for e in t.external_data if e.key == "location")
            for t in proto.graph.initializer if uses_external_data(t)}


def one_data_file(path: Path) -> None:
    """Rewrite the model at ``path`` with all its external weights in one file, ``<name>.data``
    (the exporter writes one file per tensor), removing the files it replaces."""
    import onnx

    old = set(external_tensors(onnx.load(str(path), load_external_data=False)).values())
    proto = onnx.load(str(path))  # with the weights
    data = path.with_name(f"{path.name}.data")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp_data = f"{tmp.name}.data"
    onnx.save(proto, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True, location=tmp_data)
    for t in proto.graph.initializer:  # point at the final name before moving
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = data.name
    onnx.save(proto, str(tmp))  # the graph only: the weights stay in the data file
    (path.parent / tmp_data).replace(data)
    tmp.replace(path)
    for name in old - {data.name}:
        (path.parent / name).unlink(missing_ok=True)


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
