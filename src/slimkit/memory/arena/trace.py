"""Tracing the model into an ATen graph with ``torch.export``, naming the operator when
export fails, and refusing graphs a static plan cannot hold."""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import re
import sys
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from slimkit.memory.arena.errors import TraceError


class _ExportFailed(Exception):
    def __init__(self, error: Exception, log: str):
        super().__init__(str(error))
        self.error, self.log = error, log


def _describe_export_error(failed: _ExportFailed, module: nn.Module) -> tuple[str, str | None]:
    """The first line of a torch.export error, where in the model it happened, and the
    operator: an ATen name from the message or from the partial graph export printed,
    else the line of model code."""
    text = str(failed.error)
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(failed.error).__name__).rstrip(".")
    where, code = "", None
    frames = re.findall(r'File "([^"]+)", line (\d+), in \w+\n\s*(.+)', text)
    if not frames:  # else the deepest frame of the traceback in the model's own file
        try:
            source = inspect.getsourcefile(type(module))
        except TypeError:
            source = None
        frames = [(f.filename, f.lineno, f.line or "") for f in traceback.extract_tb(failed.error.__traceback__)
                  if source and f.filename == source]
    if frames:
        path, line, code = frames[-1]
        code = code.strip()
        where = f" at {Path(path).name}:{line} (`{code}`)"
    ops = re.findall(r"\b(?:torch\.ops\.)?(aten\.\w+\.\w+)", text) or re.findall(r"torch\.ops\.(aten\.\w+\.\w+)", failed.log)
    # The graph printed so far ends with the operator that stopped the trace.
    return f"{first}{where}", ops[-1] if ops else code


def _export(module: nn.Module, inputs: Sequence[torch.Tensor], dynamic: dict[int, list[int]] | None):
    """``torch.export`` then functionalise to ATen (keeping linear, conv, norms, SDPA whole).

    ``dynamic`` maps input index to the dimensions to trace symbolically.

    Raises:
        _ExportFailed: with the error and what export printed (the graph traced so far).
    """
    shapes = None
    if dynamic is not None:
        shapes = tuple({d: torch.export.Dim.AUTO for d in dynamic.get(i, [])} or None for i in range(len(inputs)))
    log = io.StringIO()
    shape_log = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    level = shape_log.level
    shape_log.setLevel(logging.ERROR)
    try:
        # A failing export prints the partial graph to stderr: keep it to name the operator.
        with warnings.catch_warnings(), contextlib.redirect_stderr(log):
            warnings.simplefilter("ignore")
            ep = torch.export.export(module, tuple(inputs), dynamic_shapes=shapes)
            ep = ep.run_decompositions({})
    except Exception as e:
        raise _ExportFailed(e, log.getvalue()) from e
    finally:
        shape_log.setLevel(level)
    if log.getvalue():
        sys.stderr.write(log.getvalue())  # the model's own prints while it was traced
    return ep


def _check_graph(ep) -> None:
    """Refuse what a static plan cannot hold: data-dependent sizes, control-flow operators,
    mutated buffers."""
    from torch.export.graph_signature import InputKind, OutputKind
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    for spec in ep.graph_signature.output_specs:
        if spec.kind != OutputKind.USER_OUTPUT:
            raise TraceError(f"the model mutates {spec.target or 'an input'} ({spec.kind.name}); an arena "
                             "plan needs a model that only reads its buffers", str(spec.target))
    for spec in ep.graph_signature.input_specs:
        if spec.kind == InputKind.TOKEN:
            raise TraceError("the model has side effects (effect tokens); run it eagerly", "token")
    for node in ep.graph.nodes:
        if node.op in ("call_module", "get_attr") or (
            node.op == "call_function" and isinstance(node.target, torch._ops.HigherOrderOperator)
        ):
            raise TraceError(f"{node.target} (node {node.name}) is control flow or a submodule; the arena "
                             "plans straight-line graphs", str(node.target))
        if node.op == "call_function" and free_unbacked_symbols(node.meta.get("val")):
            raise TraceError(f"{node.target} (node {node.name}) makes a size or value that depends on the input "
                             "data; an arena needs every size known before the model runs", str(node.target))
