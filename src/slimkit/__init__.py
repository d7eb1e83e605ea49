"""slimkit: make neural models fit, and prove what it cost.

Imports are lazy so that a process serving an ONNX model (``slimkit.deploy.ort_runtime``)
does not load torch.
"""

from __future__ import annotations

from slimkit.lazy import lazy_getattr

__version__ = "0.1.0"

_EXPORTS = {
    "quantize_": "slimkit.quantize.api",
    "prune_": "slimkit.prune.api",
    "distill": "slimkit.distill",  # the package is the verb: slimkit.distill(teacher, student, data, config)
    "cluster_": "slimkit.compress.api",
    "export": "slimkit.deploy.export",
    "load_model": "slimkit.serialize",
    "load_task": "slimkit.zoo.tasks",
    "save": "slimkit.serialize",
    "load": "slimkit.serialize",
    "Recipe": "slimkit.recipe",
    "run": "slimkit.runner",
}

__all__ = list(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
