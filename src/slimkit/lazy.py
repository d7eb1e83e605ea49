"""Lazy package exports: names imported from their modules on first use.

A package's ``__init__`` lists where each public name lives; nothing is imported until
the name is read, so ``import slimkit`` (or a serving process that needs only ONNX
Runtime) never pays for torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_getattr(package: str, exports: Mapping[str, str]) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` for ``package`` that imports ``exports[name]`` and
    returns its ``name``, or the module itself when it is the subpackage ``name`` (such
    as ``slimkit.distill``, which is callable as the verb)."""

    def __getattr__(name: str) -> Any:
        if name in exports:
            module = importlib.import_module(exports[name])
            return module if exports[name] == f"{package}.{name}" else getattr(module, name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
