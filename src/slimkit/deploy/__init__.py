"""Deployment: ONNX export and ONNX Runtime sessions (imported lazily; see slimkit/__init__)."""

from __future__ import annotations

from slimkit.lazy import lazy_getattr

_EXPORTS = {
    "ExportConfig": "slimkit.deploy.export",
    "export": "slimkit.deploy.export",
    "OnnxModel": "slimkit.deploy.onnx_model",
    "OrtEncoder": "slimkit.deploy.ort_runtime",
}
__all__ = list(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
