"""Deployment: ONNX export and ONNX Runtime sessions (imported lazily; see slimkit/__init__)."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ExportConfig": "slimkit.deploy.export",
    "export": "slimkit.deploy.export",
    "OnnxModel": "slimkit.deploy.onnx_model",
    "OrtEncoder": "slimkit.deploy.ort_runtime",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(name)
