"""Tracing a model with ``torch.fx`` and recording the shape of every tensor in the graph."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import fx, nn

from slimkit.config import LayerSelector
from slimkit.errors import ConfigError, SlimkitError
from slimkit.layers import select_names
from slimkit.modes import eval_mode


class UntraceableModel(SlimkitError):
    """``torch.fx`` could not trace the model; the message names the module that failed."""


class _Tracer(fx.Tracer):
    """Records which module was being traced when tracing fails; treats ``leaves`` as opaque."""

    def __init__(self, leaves: set[str]):
        super().__init__()
        self.leaves = leaves
        self.failed_in: tuple[str, str] | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.leaves or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:  # the innermost module is the first to see it
                try:
                    path = self.path_of_module(m)
                except NameError:  # a module created inside forward has no name
                    path = ""
                self.failed_in = (path, type(m).__name__)
            raise


def trace(model: nn.Module, exclude: Iterable[str] = ()) -> fx.GraphModule:
    """Trace ``model`` with ``torch.fx``, keeping the modules named in ``exclude`` opaque.

    Args:
        model: the model.
        exclude: qualified module names (or ``re:`` regexes) that are not traced into.

    Raises:
        UntraceableModel: tracing failed (data-dependent control flow, unsupported Python);
            the message names the innermost module being traced and how to exclude it.
        LayerSelectionError: a name in ``exclude`` matches no module.
    """
    return trace_with_leaves(model, excluded_modules(model, exclude))


def trace_with_leaves(model: nn.Module, leaves: set[str]) -> fx.GraphModule:
    """:func:`trace` with the opaque modules already resolved to qualified names."""
    tracer = _Tracer(leaves)
    try:
        graph = tracer.trace(model)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if tracer.failed_in and tracer.failed_in[0]:
            name, kind = tracer.failed_in
            raise UntraceableModel(
                f"torch.fx cannot trace module {name!r} ({kind}) of {type(model).__name__}: {first}. "
                f"Pass exclude=[{name!r}] to keep it as an opaque leaf: it then runs as written, and "
                "the channels flowing into and out of it are not pruned"
            ) from e
        raise UntraceableModel(
            f"torch.fx cannot trace the forward of {type(model).__name__} itself: {first}. Rewrite "
            "the data-dependent part of forward, or analyse a submodule instead"
        ) from e
    return fx.GraphModule(model, graph, type(model).__name__)


def excluded_modules(model: nn.Module, exclude: Iterable[str]) -> set[str]:
    """The qualified names of the modules that ``exclude`` (names or ``re:`` regexes) selects."""
    patterns = list(exclude or ())
    if not patterns:
        return set()
    names = [n for n, _ in model.named_modules() if n]
    return set(select_names(names, LayerSelector(targets=patterns), what="module"))


class _ShapeRecorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.shapes: dict[fx.Node, tuple[int, ...]] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            self.shapes[n] = tuple(result.shape)
        return result


def record_shapes(
    model: nn.Module, gm: fx.GraphModule, inputs: tuple
) -> tuple[dict[fx.Node, tuple[int, ...]], list[tuple[int, ...]]]:
    """Run ``gm`` (traced from ``model``) on ``inputs``.

    Returns:
        The shape of every tensor node, and of every tensor in the output (see
        :func:`output_shapes`).

    Raises:
        ConfigError: the model fails on ``inputs``; the message names the original error.
    """
    # Eval mode so that batch norm does not update its running statistics, and dropout
    # does not draw; the traced graph is the same in both modes.
    with eval_mode(model):
        try:
            recorder = _ShapeRecorder(gm)
            with torch.no_grad():
                result = recorder.run(*inputs)
        except Exception as e:
            # Name the original error: it may be a bug in the model rather than a bad input.
            lines = str(e).strip().splitlines()
            what = f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
            raise ConfigError(f"example_input: the model fails on it ({what}); give an input the model accepts") from e
    return recorder.shapes, output_shapes(result)


def output_shapes(output: Any) -> list[tuple[int, ...]]:
    """The shapes of the tensors in a model's output (a tensor, or tuples, lists, dicts of them)."""
    leaves, _ = pytree.tree_flatten(output)
    return [tuple(t.shape) for t in leaves if isinstance(t, torch.Tensor)]
