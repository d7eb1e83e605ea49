"""An activation arena: run a traced model with every intermediate tensor placed in one
buffer allocated once, so that a serving loop allocates nothing after warm-up.

How it works, for each shape bucket ``(batch, seq)``:

1. **Trace.** ``torch.export`` turns the model into an ATen graph (weights and inputs are
   graph inputs; every other tensor is an intermediate). One trace with a dynamic batch
   (and sequence) dimension serves every bucket; a model that cannot be traced that way
   is traced once per bucket with fixed shapes.
2. **Measure.** The graph runs once, eagerly, on the bucket's shapes. Every node's output
   gives its size, dtype and strides, and which storage it lives in: a view (reshape,
   transpose, slice, ...) shares its base's storage, so the storage lives until the last
   use of any of its views. Nodes that depend only on weights and shapes (position ids,
   masks built from ``arange``) are computed here once and kept as constants.
3. **Reuse.** An elementwise operator whose input dies at that operator writes its result
   over the input (``add``, ``hardtanh``, ``gelu``, batch and layer norm, ...), and a copy
   whose source dies (``clone`` left by dropout in eval mode) becomes the source itself,
   as eager PyTorch does with ``inplace=True`` layers.
4. **Plan.** Each remaining storage, and each scratch buffer an operator needs, is a
   tensor with a size and a lifetime; :mod:`slimkit.memory.planner` gives each an offset
   in the arena (the best of its strategies for this graph).
5. **Bind.** Every output becomes a view of the arena at its offset, laid out exactly as
   eager PyTorch laid it out, so views of it behave the same. Each operator is bound to
   a kernel that writes into those views: the ATen ``out=`` overload where the operator
   has one, or a lowering that avoids the allocating kernel (linear as ``addmm``, 1x1 and
   depthwise convolutions, batch and layer norm, attention as ``baddbmm``/``softmax``/
   ``bmm`` into a planned scratch buffer), else the ordinary operator followed by a copy
   into the arena. Each kernel is then checked against the eager result of its node;
   one that disagrees is replaced by the ordinary operator plus copy.

At run time a request is copied into the bucket's input buffer (padded up to the bucket:
extra rows repeat the first row, extra sequence positions take ``pad_values``), the bound
kernels run in order, and the outputs are returned cut back to the request's size.

Weights and inputs never live in the arena. Outputs do: with ``copy=False`` they are views
that the next call overwrites. One executor serves one request at a time.
"""

from __future__ import annotations

import bisect
import contextlib
import inspect
import io
import logging
import math
import operator
import re
import sys
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import field_validator
from torch import nn
from torch.utils import _pytree as pytree

from slimkit.config import SlimConfig
from slimkit.errors import ConfigError, SlimkitError
from slimkit.memory.planner import MemoryPlan, TensorLife, plan_memory

aten = torch.ops.aten
Kernel = Callable[[], None]


class TraceError(SlimkitError):
    """The model cannot be traced into a graph the arena can plan; ``operator`` names the
    operator (or the line of model code) that stopped it."""

    def __init__(self, message: str, operator: str | None = None):
        super().__init__(message)
        self.operator = operator


class ArenaFallbackWarning(UserWarning):
    """An arena could not be planned (or a request fits no bucket): the model runs eagerly."""


class ArenaConfig(SlimConfig):
    """How to plan and run an activation arena.

    Attributes:
        batch_buckets: batch sizes to plan for; a request runs in the smallest bucket that
            holds it, padded up to it.
        seq_buckets: sequence lengths to plan for (empty: inputs have no sequence
            dimension, so their non-batch shape must match the example inputs). Padding
            along the sequence is only correct for models that mask padded positions
            (attention masks), which is why it must be asked for.
        seq_dim: the sequence dimension of every input that has one.
        pad_values: value written into padded sequence positions, one per input
            (missing ones are 0: the [PAD] token id, and 0 in an attention mask).
        alignment: every offset in the arena is a multiple of it (bytes, a power of two).
        strategy: planning strategy, or ``auto`` for the best per graph.
        reuse_inputs: let elementwise operators write over an input that dies there, and
            turn copies of dying tensors into no-ops.
        check_rtol: relative tolerance of the per-node check of every kernel at warm-up.
        check_atol: absolute tolerance of that check.
    """

    kind = "memory"
    method = "arena"
    batch_buckets: list[int] = [1]
    seq_buckets: list[int] = []
    seq_dim: int = 1
    pad_values: list[float] = []
    alignment: int = 64
    strategy: Literal["auto", "greedy_by_size", "greedy_by_breadth", "greedy_by_lifetime"] = "auto"
    reuse_inputs: bool = True
    check_rtol: float = 1e-4
    check_atol: float = 1e-5

    @field_validator("batch_buckets", "seq_buckets")
    @classmethod
    def _buckets(cls, v: list[int]) -> list[int]:
        if any(b < 1 for b in v):
            raise ValueError(f"bucket sizes must be >= 1, got {v}")
        return sorted(set(v))

    @field_validator("batch_buckets")
    @classmethod
    def _some_batch(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("give at least one batch bucket, such as [1]")
        return v

    @field_validator("seq_dim")
    @classmethod
    def _seq_dim(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"seq_dim must be >= 1 (dimension 0 is the batch), got {v}")
        return v

    @field_validator("alignment")
    @classmethod
    def _alignment(cls, v: int) -> int:
        if v < 8 or v & (v - 1):
            raise ValueError(f"alignment must be a power of two >= 8, got {v}")
        return v


# -- tracing ---------------------------------------------------------------------------


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


# -- lowerings: operators bound to kernels that write into arena views ------------------

# A lowering looks at a node's eager arguments and outputs and returns the scratch buffers
# it needs ([(shape, dtype)]) and a binder, or None when it does not apply. The binder gets
# the bound arguments (by name), the output views and the scratch views, and returns the
# kernel, or None to fall back to the ordinary operator plus a copy.
Binder = Callable[[dict, list, list], "Kernel | None"]
Lowering = Callable[[dict, list], "tuple[list[tuple[tuple[int, ...], torch.dtype]], Binder] | None"]
_LOWERINGS: dict[Any, Lowering] = {}

# Elementwise operators (TensorIterator kernels): each output element is written after
# the input elements it reads, so the output may be one of the inputs of the same layout.
_POINTWISE = {
    "add", "sub", "mul", "div", "hardtanh", "relu", "gelu", "silu", "sigmoid", "tanh", "clamp",
    "clamp_min", "clamp_max", "neg", "exp", "log", "sqrt", "rsqrt", "erf", "hardswish", "hardsigmoid",
    "leaky_relu", "elu", "pow", "where", "abs", "reciprocal", "bitwise_and", "bitwise_or",
    "__and__", "__or__", "logical_not", "masked_fill",
}
# Lowerings that may write over an input, and which arguments (filled by @_lowering).
_INPLACE_ARGS: dict[Any, tuple[str, ...]] = {}
# Copies: when the source dies here, the output can simply be the source.
_COPIES = {aten.clone.default, aten._to_copy.default, aten.alias.default}
# Operators without an out= overload of their own that are another operator's alias.
_ALIASES = {
    aten.__and__.Tensor: aten.bitwise_and.Tensor,
    aten.__or__.Tensor: aten.bitwise_or.Tensor,
    aten.__xor__.Tensor: aten.bitwise_xor.Tensor,
}


def _lowering(*ops, inplace: tuple[str, ...] = ()):
    def wrap(fn: Lowering) -> Lowering:
        for op in ops:
            _LOWERINGS[op] = fn
            if inplace:
                _INPLACE_ARGS[op] = inplace
        return fn

    return wrap


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[-1]))


def _scalar(value, dtype: torch.dtype) -> torch.Tensor:
    """A 0-dim tensor: passing it instead of a Python number keeps kernels from wrapping
    the number in a fresh tensor on every call."""
    return torch.tensor(value, dtype=dtype)


@_lowering(aten.linear.default)
def _linear(a: dict, outs: list):
    def bind(b: dict, o: list, s: list):
        x, w, bias, out = b["input"], b["weight"], b.get("bias"), o[0]
        try:
            x2, o2 = x.view(-1, x.shape[-1]), out.view(-1, out.shape[-1])
        except RuntimeError:
            return None
        wt = w.t()
        if bias is None:
            return lambda: torch.mm(x2, wt, out=o2)
        return lambda: torch.addmm(bias, x2, wt, out=o2)

    return [], bind


@_lowering(aten.conv2d.default)
def _conv2d(a: dict, outs: list):
    x, w = a["input"], a["weight"]
    if x.dim() != 4 or not x.is_floating_point() or len(outs) != 1:
        return None
    stride, pad, dil = _pair(a.get("stride", 1)), _pair(a.get("padding", 0)), _pair(a.get("dilation", 1))
    groups = int(a.get("groups", 1))
    cout, cin_g, kh, kw = w.shape
    n, c = x.shape[:2]
    out = outs[0]
    length = out.shape[2] * out.shape[3]
    if groups == 1 and (kh, kw) == (1, 1) and stride == (1, 1) and pad == (0, 0):
        return [], _bind_conv_matmul(None)
    if groups == 1:
        # im2col + matmul needs a column buffer (one sample's, reused across the batch);
        # past 4x the output, or 1 MiB, it costs more arena than the allocation it saves.
        cols = (1, c * kh * kw, length)
        if math.prod(cols) * x.element_size() > max(4 * out[0].numel() * x.element_size(), 1 << 20):
            return None
        return [(cols, x.dtype)], _bind_conv_matmul(((kh, kw), dil, pad, stride))
    if groups == c == cout and cin_g == 1:
        return [], _bind_depthwise(stride, pad, dil)
    return None


def _bind_conv_matmul(im2col):
    def bind(b: dict, o: list, s: list):
        x, w, bias, out = b["input"], b["weight"], b.get("bias"), o[0]
        cout = w.shape[0]
        w2 = w.reshape(cout, -1)
        try:
            outs = [out[i].view(cout, -1) for i in range(out.shape[0])]
            cols = [x[i].view(x.shape[1], -1) for i in range(x.shape[0])] if im2col is None else None
        except RuntimeError:
            return None
        bias_col = bias.view(cout, 1).expand(cout, outs[0].shape[1]) if bias is not None else None
        samples = [x[i: i + 1] for i in range(x.shape[0])]

        def matmul(col, oi):
            if bias_col is None:
                torch.mm(w2, col, out=oi)
            else:
                torch.addmm(bias_col, w2, col, out=oi)

        def run():
            if im2col is None:
                for col, oi in zip(cols, outs, strict=True):
                    matmul(col, oi)
                return
            for sample, oi in zip(samples, outs, strict=True):
                aten.im2col.out(sample, *im2col, out=s[0])
                matmul(s[0][0], oi)

        return run

    return bind


def _tap_range(k: int, stride: int, pad: int, dil: int, size_in: int, size_out: int) -> tuple[int, int]:
    """Output positions ``o`` whose input ``o*stride - pad + k*dil`` lies inside the input."""
    lo = max(0, -(-(pad - k * dil) // stride))
    hi = min(size_out, (size_in - 1 + pad - k * dil) // stride + 1)
    return lo, hi


def _bind_depthwise(stride, pad, dil):
    """Depthwise convolution as one multiply-add per filter tap over shifted views: no
    column buffer and no allocation, at a cost close to the library kernel's."""

    def bind(b: dict, o: list, s: list):
        x, w, bias, out = b["input"], b["weight"], b.get("bias"), o[0]
        c, (h, wd), (oh, ow) = x.shape[1], x.shape[2:], out.shape[2:]
        taps = []
        for i in range(w.shape[2]):
            y0, y1 = _tap_range(i, stride[0], pad[0], dil[0], h, oh)
            for j in range(w.shape[3]):
                x0, x1 = _tap_range(j, stride[1], pad[1], dil[1], wd, ow)
                if y0 >= y1 or x0 >= x1:
                    continue
                iy, ix = y0 * stride[0] - pad[0] + i * dil[0], x0 * stride[1] - pad[1] + j * dil[1]
                src = x[:, :, iy: iy + (y1 - y0 - 1) * stride[0] + 1: stride[0], ix: ix + (x1 - x0 - 1) * stride[1] + 1: stride[1]]
                taps.append((out[:, :, y0:y1, x0:x1], src, w[:, 0, i, j].view(1, c, 1, 1), (y0, y1, x0, x1) == (0, oh, 0, ow)))
        full = next((t for t in taps if t[3]), None) if bias is None else None
        rest = [t for t in taps if t is not full]
        init = bias.view(1, c, 1, 1).expand_as(out) if bias is not None else None

        def run():
            if full is not None:
                torch.mul(full[1], full[2], out=out)
            elif init is not None:
                out.copy_(init)
            else:
                out.zero_()
            for dst, src, wt, _ in rest:
                dst.addcmul_(src, wt)

        return run

    return bind


@_lowering(aten._native_batch_norm_legit_no_training.default, aten.batch_norm.default, inplace=("input",))
def _batch_norm(a: dict, outs: list):
    if a.get("training", False) or not a["input"].is_floating_point():
        return None

    def bind(b: dict, o: list, s: list):
        x, w, bias = b["input"], b.get("weight"), b.get("bias")
        # Eager's inference kernel: out = x * (w / sqrt(var + eps)) + (b - mean * that).
        invstd = 1 / torch.sqrt(b["running_var"] + b["eps"])
        scale = invstd * w if w is not None else invstd
        shift = -b["running_mean"] * scale if bias is None else bias - b["running_mean"] * scale
        shape = (1, -1) + (1,) * (x.dim() - 2)
        scale, shift, out = scale.reshape(shape), shift.reshape(shape), o[0]
        return lambda: torch.addcmul(shift, x, scale, out=out)

    return [], bind


@_lowering(aten.layer_norm.default, inplace=("input",))
def _layer_norm(a: dict, outs: list):
    x = a["input"]
    if not x.is_floating_point() or len(outs) != 1:
        return None
    d = math.prod(a["normalized_shape"])
    rows = x.numel() // d if d else 0
    return [((rows, 1), x.dtype), ((rows, 1), x.dtype)], _bind_layer_norm(d)


def _bind_layer_norm(d: int):
    def bind(b: dict, o: list, s: list):
        x, w, bias, out = b["input"], b.get("weight"), b.get("bias"), o[0]
        try:
            x2, o2 = x.view(-1, d), out.view(-1, d)
        except RuntimeError:
            return None
        w, bias = (w.reshape(d) if w is not None else None), (bias.reshape(d) if bias is not None else None)
        mean, var = s
        n_t, eps_t = _scalar(d, x.dtype), _scalar(b.get("eps", 1e-5), x.dtype)

        def run():
            # Statistics first: the output may be the input (written over in place).
            torch.sum(x2, -1, keepdim=True, out=mean)
            mean.div_(n_t)
            torch.var(x2, -1, correction=0, keepdim=True, out=var)
            var.add_(eps_t).rsqrt_()
            torch.sub(x2, mean, out=o2)
            o2.mul_(var)
            if w is not None and bias is not None:
                torch.addcmul(bias, o2, w, out=o2)
            elif w is not None:
                o2.mul_(w)
            elif bias is not None:
                o2.add_(bias)

        return run

    return bind


@_lowering(aten.scaled_dot_product_attention.default)
def _sdpa(a: dict, outs: list):
    q, k, v, mask = a["query"], a["key"], a["value"], a.get("attn_mask")
    if (a.get("dropout_p", 0.0) or a.get("enable_gqa", False) or q.dim() != 4 or not q.is_floating_point()
            or k.shape[:2] != q.shape[:2] or v.shape[:2] != q.shape[:2] or len(outs) != 1):
        return None
    if mask is not None and a.get("is_causal", False):
        return None
    scratch = [((*q.shape[:3], k.shape[2]), q.dtype)]
    if mask is not None and mask.dtype == torch.bool:
        scratch.append((tuple(mask.shape), q.dtype))
    return scratch, _bind_sdpa


def _bind_sdpa(b: dict, o: list, s: list):
    q, k, v, mask, out = b["query"], b["key"], b["value"], b.get("attn_mask"), o[0]
    scores = s[0]
    scale = b.get("scale") or 1.0 / math.sqrt(q.shape[-1])
    rows = [(scores[i], q[i], k[i].transpose(-1, -2), v[i], out[i]) for i in range(q.shape[0])]
    prepare = None
    if mask is not None and mask.dtype == torch.bool:
        additive, zero, minus_inf = s[1], _scalar(0.0, q.dtype), _scalar(float("-inf"), q.dtype)

        def prepare():
            torch.where(mask, zero, minus_inf, out=additive)
    elif mask is not None:
        additive = mask
    elif b.get("is_causal", False):
        length, source = q.shape[2], k.shape[2]
        additive = torch.zeros(length, source, dtype=q.dtype, device=q.device).masked_fill_(
            torch.ones(length, source, dtype=torch.bool, device=q.device).tril().logical_not(), float("-inf"))
    else:
        additive = None

    def run():
        if prepare is not None:
            prepare()
        for sc, qi, kt, _, _ in rows:
            torch.baddbmm(sc, qi, kt, beta=0, alpha=scale, out=sc)
        if additive is not None:
            scores.add_(additive)
        aten._softmax.out(scores, -1, False, out=scores)
        for sc, _, _, vi, oi in rows:
            torch.bmm(sc, vi, out=oi)

    return run


@_lowering(aten.embedding.default)
def _embedding(a: dict, outs: list):
    def bind(b: dict, o: list, s: list):
        w, idx, out = b["weight"], b["indices"], o[0]
        try:
            flat, o2 = idx.view(-1), out.view(-1, w.shape[1])
        except RuntimeError:
            return None
        return lambda: torch.index_select(w, 0, flat, out=o2)

    return [], bind


@_lowering(*_COPIES)
def _copy(a: dict, outs: list):
    if len(outs) != 1 or (a.get("device") is not None and torch.device(a["device"]) != outs[0].device):
        return None

    def bind(b: dict, o: list, s: list):
        x, out = b["self"], o[0]
        return lambda: out.copy_(x)

    return [], bind


def _bind_sum_div(dims: list[int], count: int, keepdim: bool = True):
    """A mean as sum then divide: ``mean.out`` wraps its divisor in a new tensor per call."""

    def bind(b: dict, o: list, s: list):
        x, out = b["self"], o[0]
        n_t = _scalar(count, out.dtype)

        def run():
            torch.sum(x, dims, keepdim=keepdim, out=out)
            out.div_(n_t)

        return run

    return bind


@_lowering(aten.adaptive_avg_pool2d.default)
def _adaptive_avg_pool2d(a: dict, outs: list):
    x = a["self"]
    if tuple(_pair(a["output_size"])) != (1, 1) or not x.is_floating_point() or x.dim() != 4:
        return None
    return [], _bind_sum_div([-2, -1], x.shape[-2] * x.shape[-1])


@_lowering(aten.mean.dim)
def _mean(a: dict, outs: list):
    x, dims = a["self"], a.get("dim")
    if a.get("dtype") is not None or not x.is_floating_point() or not dims:
        return None
    dims = [d % x.dim() for d in dims]
    return [], _bind_sum_div(dims, math.prod(x.shape[d] for d in dims), bool(a.get("keepdim", False)))


@_lowering(aten.relu.default, inplace=("self",))
def _relu(a: dict, outs: list):
    # relu's out= overload is generated (compute, then copy); clamp_min's is a real kernel.
    def bind(b: dict, o: list, s: list):
        x, out = b["self"], o[0]
        return lambda: torch.clamp_min(x, 0, out=out)

    return [], bind


def _out_overload(op, device: torch.device):
    """The ``out=`` overload of ``op`` taking the same arguments, its out names, and whether
    it is a kernel of its own on ``device`` (a generated one computes, then copies)."""
    op = _ALIASES.get(op, op)
    if not isinstance(op, torch._ops.OpOverload):
        return None
    names = [a.name for a in op._schema.arguments]
    for name in op.overloadpacket.overloads():
        cand = getattr(op.overloadpacket, name)
        outs = [a.name for a in cand._schema.arguments if a.is_out]
        if outs and len(outs) == len(op._schema.returns) and [
            a.name for a in cand._schema.arguments if not a.is_out
        ] == names:
            native = torch._C._dispatch_has_kernel_for_dispatch_key(cand.name(), device.type.upper())
            return cand, outs, native
    return None


# -- analysis of one bucket -----------------------------------------------------------


def _by_name(op, args: tuple, kwargs: dict) -> dict:
    """A node's arguments keyed by schema name."""
    if not isinstance(op, torch._ops.OpOverload):
        return {}
    named = dict(kwargs)
    for arg, value in zip([a for a in op._schema.arguments if not a.kwarg_only], args, strict=False):
        named[arg.name] = value
    return named


def _tensors(value) -> list[torch.Tensor | None]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)) and all(v is None or isinstance(v, torch.Tensor) for v in value):
        return list(value)
    return []


def _layout(t: torch.Tensor) -> tuple:
    return t.dtype, tuple(t.shape), tuple(t.stride())


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _arg_nodes(node: torch.fx.Node) -> list[torch.fx.Node]:
    found: list[torch.fx.Node] = []
    torch.fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) or n)
    return found


@dataclass
class _Group:
    """One storage in the arena: its owner's eager tensor, and the steps that use it."""

    owner: torch.fx.Node
    index: int
    nbytes: int
    first: int
    uses: list[int] = field(default_factory=list)


@dataclass
class _Compute:
    node: torch.fx.Node
    step: int
    lowering: tuple | None = None
    out_op: tuple | None = None
    reuse: torch.fx.Node | None = None  # the argument written over (in place), if any
    elided: bool = False
    scratch: list[tuple[int, tuple[int, ...], torch.dtype]] = field(default_factory=list)  # (lifetime index, shape, dtype)


@dataclass
class _Bucket:
    batch: int
    seq: int | None
    input_shapes: list[tuple[int, ...]]
    plan: MemoryPlan | None = None
    plain_plan: MemoryPlan | None = None  # the same graph without in-place reuse or copy elision
    lives: list[TensorLife] = field(default_factory=list)
    # filled when bound
    inputs: list[torch.Tensor] = field(default_factory=list)
    steps: list[tuple[str, Kernel]] = field(default_factory=list)
    outputs: list[Any] = field(default_factory=list)
    out_batch: list[bool] = field(default_factory=list)
    out_seq: list[tuple[int, ...]] = field(default_factory=list)
    out_spec: Any = None
    counts: dict[str, int] = field(default_factory=dict)
    step_output_bytes: dict[str, set[int]] = field(default_factory=dict)
    constant_bytes: int = 0
    pad_batch: bool = False  # requests with fewer rows may run here (outputs keep the batch dimension)
    pad_seq: bool = False  # requests with a shorter sequence may run here (the trace knows its symbol)


class _Analysis:
    """Everything known about one bucket's graph before the arena exists."""

    def __init__(self, ep, module: nn.Module, inputs: list[torch.Tensor], config: ArenaConfig):
        from torch.export.graph_signature import InputKind

        self.ep, self.gm, self.config = ep, ep.graph_module, config
        self.params: dict[torch.fx.Node, Any] = {}
        self.user_inputs: list[torch.fx.Node] = []
        named = dict(module.named_parameters(remove_duplicate=False)) | dict(module.named_buffers(remove_duplicate=False))
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        wanted = sum(spec.kind == InputKind.USER_INPUT for spec in ep.graph_signature.input_specs)
        if wanted != len(inputs):
            raise TraceError(f"the traced graph takes {wanted} tensor inputs, {len(inputs)} were given; "
                             "give every positional input of the model", None)
        flat_args = []
        for node, spec in zip(placeholders, ep.graph_signature.input_specs, strict=True):
            if spec.kind == InputKind.USER_INPUT:
                value = inputs[len(self.user_inputs)]
                self.user_inputs.append(node)
            elif spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
                value = named.get(spec.target)
                if value is None:
                    value = ep.state_dict.get(spec.target, ep.constants.get(spec.target))
                self.params[node] = value
            else:
                value = ep.constants[spec.target]
                self.params[node] = value
            flat_args.append(value)
        interp = torch.fx.Interpreter(self.gm, garbage_collect_values=False)
        with torch.no_grad():
            interp.run(*flat_args)
        self.env: dict[torch.fx.Node, Any] = dict(interp.env)
        self.out_node = next(n for n in self.gm.graph.nodes if n.op == "output")
        self._classify()
        self._place()

    # which nodes run per request, which are constants, which are views
    def _classify(self) -> None:
        shape_ops = {aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int}
        self.dynamic: dict[torch.fx.Node, bool] = {n: True for n in self.user_inputs}
        self.kind: dict[torch.fx.Node, str] = {}
        for node in self.gm.graph.nodes:
            if node.op != "call_function":
                continue
            value, target = self.env[node], node.target
            dyn = target not in shape_ops and any(self.dynamic.get(a, False) for a in _arg_nodes(node))
            if isinstance(target, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in target.tags:
                dyn = True
            self.dynamic[node] = dyn
            if not dyn:
                self.kind[node] = "constant"
            elif value is None:
                self.kind[node] = "noop"
            elif not _tensors(value):
                raise TraceError(f"{target} (node {node.name}) turns input data into a Python value "
                                 f"({type(value).__name__}); an arena plan needs tensors throughout", str(target))
            elif target is operator.getitem or (
                isinstance(target, torch._ops.OpOverload)
                and any(r.alias_info is not None and not r.alias_info.is_write for r in target._schema.returns)
            ):
                self.kind[node] = "view"
            else:
                self.kind[node] = "compute"

    # storages, lifetimes, in-place reuse, scratch
    def _place(self) -> None:
        external = {_storage_key(t) for t in self.params.values() if isinstance(t, torch.Tensor)}
        external |= {_storage_key(self.env[n]) for n in self.user_inputs}
        for node, kind in self.kind.items():
            if kind == "constant":
                external |= {_storage_key(t) for t in _tensors(self.env[node]) if t is not None}
        self.groups: list[_Group] = []
        self._merged: dict[int, int] = {}  # group written over in place -> the group it reuses
        by_key: dict[int, int] = {}
        self.slot_group: dict[tuple[torch.fx.Node, int], int | None] = {}
        self.computes: list[_Compute] = []
        self.step: dict[torch.fx.Node, int] = {}
        for node, kind in self.kind.items():
            if kind in ("constant", "noop"):
                continue
            step = len(self.step)
            self.step[node] = step
            for i, t in enumerate(_tensors(self.env[node])):
                if t is None or t.untyped_storage().nbytes() == 0:
                    self.slot_group[(node, i)] = None
                    continue
                key = _storage_key(t)
                if key in by_key:
                    if kind == "compute":
                        raise TraceError(f"{node.target} (node {node.name}) returns memory it did not allocate "
                                         "without being a view operator; the arena cannot place it", str(node.target))
                    self.slot_group[(node, i)] = by_key[key]
                elif key in external:
                    if kind == "compute":
                        raise TraceError(f"{node.target} (node {node.name}) returns a weight's or an input's "
                                         "memory; the arena cannot place it", str(node.target))
                    self.slot_group[(node, i)] = None
                else:
                    by_key[key] = len(self.groups)
                    self.groups.append(_Group(node, i, t.untyped_storage().nbytes(), step))
                    self.slot_group[(node, i)] = by_key[key]
            if kind == "compute":
                self.computes.append(_Compute(node, step))
        self.end = len(self.step)
        for node, step in [*self.step.items(), (self.out_node, self.end)]:
            for g in self._arg_groups(node):
                self.groups[g].uses.append(step)
        own_last = [max([g.first, *g.uses]) for g in self.groups]
        for comp in self.computes:
            self._choose_kernel(comp)
        self.lives: list[TensorLife] = []
        self.group_life: dict[int, int] = {}
        for gid, g in enumerate(self.groups):
            if gid in self._merged:
                continue
            last = max([g.first, *g.uses])
            self.group_life[gid] = len(self.lives)
            self.lives.append(TensorLife(g.nbytes, g.first, last, f"{g.owner.name}[{g.index}]"))
        for comp in self.computes:
            if comp.lowering is None:
                continue
            for shape, dtype in comp.lowering[0]:
                nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
                comp.scratch.append((len(self.lives), tuple(shape), dtype))
                self.lives.append(TensorLife(nbytes, comp.step, comp.step, f"{comp.node.name}/scratch"))
        # For comparison: every storage in its own lifetime, nothing written over in place.
        self.plain_lives = [TensorLife(g.nbytes, g.first, last, f"{g.owner.name}[{g.index}]")
                            for g, last in zip(self.groups, own_last, strict=True)]
        self.plain_lives += [life for life in self.lives if life.name.endswith("/scratch")]

    def _arg_groups(self, node: torch.fx.Node) -> set[int]:
        found = set()
        for a in _arg_nodes(node):
            for i in range(len(_tensors(self.env.get(a)))):
                g = self.slot_group.get((a, i))
                if g is not None:
                    found.add(self._find(g))
        return found

    def _find(self, g: int) -> int:
        while g in self._merged:
            g = self._merged[g]
        return g

    def _choose_kernel(self, comp: _Compute) -> None:
        node = comp.node
        named = _by_name(node.target, *torch.fx.node.map_arg((node.args, node.kwargs), lambda n: self.env[n]))
        outs = [t for t in _tensors(self.env[node])]
        lower = _LOWERINGS.get(node.target)
        if lower is not None and None not in outs:
            comp.lowering = lower(named, outs)
        if comp.lowering is None:
            comp.out_op = _out_overload(node.target, outs[0].device if outs and outs[0] is not None else torch.device("cpu"))
        if self.config.reuse_inputs and len(outs) == 1 and outs[0] is not None:
            self._reuse(comp, named)

    def _reuse(self, comp: _Compute, named: dict) -> None:
        """Write ``comp``'s output over an argument that dies at this step, if one fits."""
        node = comp.node
        target = node.target
        packet = getattr(target, "overloadpacket", None)
        if target in _COPIES and comp.lowering is not None:
            candidates, elide = ("self",), True
            if self.env[node].dtype != self.env[node.args[0]].dtype:
                return
        elif target in _INPLACE_ARGS and comp.lowering is not None:
            candidates, elide = _INPLACE_ARGS[target], False
        elif packet is not None and packet.__name__ in _POINTWISE and comp.out_op is not None:
            candidates, elide = tuple(named), False
        else:
            return
        out_gid = self.slot_group.get((node, 0))
        if out_gid is None:
            return
        out = self.env[node]
        schema_args = [a for a in target._schema.arguments if not a.kwarg_only]
        arg_nodes = dict(zip([a.name for a in schema_args], node.args, strict=False)) | dict(node.kwargs)
        for name in candidates:
            arg = arg_nodes.get(name)
            if not isinstance(arg, torch.fx.Node) or not isinstance(self.env.get(arg), torch.Tensor):
                continue
            g = self.slot_group.get((arg, 0))
            if g is None:
                continue
            g = self._find(g)
            t = self.env[arg]
            if _layout(t) != _layout(out) or max(self.groups[g].uses) != comp.step:
                continue
            # Another argument in the same storage must be this very view, or the kernel
            # would read bytes it has already written.
            clash = False
            for other in _arg_nodes(node):
                if other is arg:
                    continue
                for j, ot in enumerate(_tensors(self.env.get(other))):
                    og = self.slot_group.get((other, j))
                    if og is not None and self._find(og) == g and (
                        _layout(ot) != _layout(t) or ot.storage_offset() != t.storage_offset()
                    ):
                        clash = True
            if clash:
                continue
            self._merged[out_gid] = g
            self.groups[g].uses.extend(self.groups[out_gid].uses)
            comp.reuse, comp.elided = arg, elide
            return


# -- the executor ----------------------------------------------------------------------


class ArenaExecutor:
    """Runs a traced model with its activations in one arena allocated at construction.

    Build it with :func:`build_arena`. Call it like the model: ``executor(*inputs)``.
    With ``copy=False`` the outputs are views of the arena, valid until the next call; a
    serving loop that consumes them before the next request allocates nothing.

    Attributes:
        fallback_reason: why the model runs eagerly (None when the arena is in use).
        arena_bytes: size of the arena (the largest plan over the buckets).
    """

    def __init__(self, module: nn.Module, example_inputs: Sequence[torch.Tensor], config: ArenaConfig | None = None):
        self.module = module.eval()
        self.config = config or ArenaConfig()
        self.fallback_reason: str | None = None
        self.arena_bytes = 0
        self._buckets: dict[tuple[int, int | None], _Bucket] = {}
        self._annotate = False
        self._warned: set[tuple] = set()
        examples = list(example_inputs)
        if not examples or not all(isinstance(x, torch.Tensor) for x in examples):
            raise ConfigError("example_inputs must be a non-empty sequence of tensors (the model's positional inputs)")
        self._dtypes = [x.dtype for x in examples]
        self._examples = [x.detach() for x in examples]
        self.device = examples[0].device
        try:
            self._build()
        except TraceError as e:
            self._fall_back(str(e), e.operator)

    # construction
    def _fall_back(self, reason: str, op: str | None) -> None:
        self.fallback_reason = reason
        self._buckets.clear()
        self._arena = None
        name = type(self.module).__name__
        warnings.warn(
            f"cannot plan an activation arena for {name}"
            + (f" (operator {op})" if op and op not in reason else "") + f": {reason}; running the model eagerly",
            ArenaFallbackWarning, stacklevel=3,
        )

    def _seq_inputs(self) -> list[bool]:
        return [bool(self.config.seq_buckets) and x.dim() > self.config.seq_dim for x in self._examples]

    def _bucket_inputs(self, batch: int, seq: int | None) -> list[torch.Tensor]:
        out = []
        pads = self.config.pad_values
        for i, (x, has_seq) in enumerate(zip(self._examples, self._seq_inputs(), strict=True)):
            if has_seq:
                d = self.config.seq_dim
                if x.shape[d] >= seq:
                    x = x.narrow(d, 0, seq)
                else:
                    shape = list(x.shape)
                    shape[d] = seq - x.shape[d]
                    pad = torch.full(shape, pads[i] if i < len(pads) else 0, dtype=x.dtype, device=x.device)
                    x = torch.cat([x, pad], d)
            out.append(x[torch.arange(batch, device=x.device) % x.shape[0]].contiguous())
        return out

    def _build(self) -> None:
        cfg = self.config
        keys = [(b, s) for b in cfg.batch_buckets for s in (cfg.seq_buckets or [None])]
        seq_inputs = self._seq_inputs()
        dims = {i: [0] + ([cfg.seq_dim] if has_seq else []) for i, has_seq in enumerate(seq_inputs)}
        # Trace at the largest bucket: export fixes a dimension of size 1 as a constant.
        big = self._bucket_inputs(max(cfg.batch_buckets), max(cfg.seq_buckets) if cfg.seq_buckets else None)
        shared = None
        try:
            shared = _export(self.module, big, dims)
        except _ExportFailed:  # a dynamic trace the model refuses; try fixed shapes per bucket
            shared = None
        if shared is not None:
            _check_graph(shared)
            if not self._covers(shared, dims, max(cfg.batch_buckets) > 1, bool(cfg.seq_buckets)):
                shared = None
        programs = {}
        for key in keys:
            inputs = self._bucket_inputs(*key)
            ep = shared
            if ep is None:
                try:
                    ep = _export(self.module, inputs, None)
                except _ExportFailed as e:
                    message, op = _describe_export_error(e, self.module)
                    raise TraceError(f"torch.export failed: {message}", op) from e
                _check_graph(ep)
            analysis = _Analysis(ep, self.module, inputs, cfg)
            bucket = _Bucket(key[0], key[1], [tuple(x.shape) for x in inputs], lives=analysis.lives)
            bucket.plan = plan_memory(analysis.lives, cfg.alignment, cfg.strategy)
            bucket.plain_plan = plan_memory(analysis.plain_lives, cfg.alignment, cfg.strategy)
            programs[key] = ep
            self._buckets[key] = bucket
            # Each analysis holds every eager intermediate of its bucket: keep one at a time.
            del analysis
        self.arena_bytes = max(b.plan.arena_bytes for b in self._buckets.values())
        # One arena and one staging buffer per input serve every bucket: one request runs at a time.
        self._arena = torch.empty(self.arena_bytes + cfg.alignment, dtype=torch.uint8, device=self.device)
        self._base = (-self._arena.data_ptr()) % cfg.alignment
        self._staging = [
            torch.empty(max(math.prod(b.input_shapes[i]) for b in self._buckets.values()), dtype=dt, device=self.device)
            for i, dt in enumerate(self._dtypes)
        ]
        for key, ep in programs.items():
            inputs = self._bucket_inputs(*key)
            analysis = _Analysis(ep, self.module, inputs, cfg)
            assert analysis.lives == self._buckets[key].lives, "the analysis of a bucket changed between runs"
            self._bind(self._buckets[key], analysis, inputs)
            del analysis
        self.staging_bytes = sum(s.numel() * s.element_size() for s in self._staging)

    @staticmethod
    def _covers(ep, dims: dict[int, list[int]], need_batch: bool, need_seq: bool) -> bool:
        """Whether the shared trace kept the batch (and sequence) dimension symbolic."""
        users = [n for n in ep.graph.nodes if n.op == "placeholder"][-len(dims):]
        for i, node in enumerate(users):
            shape = node.meta["val"].shape
            for j, d in enumerate(dims[i]):
                if (need_batch if j == 0 else need_seq) and isinstance(shape[d], int):
                    return False
        return True

    def _region(self, offset: int, t: torch.Tensor) -> torch.Tensor:
        """A view of the arena at ``offset`` laid out like the eager tensor ``t``."""
        nbytes = t.untyped_storage().nbytes()
        typed = self._arena[self._base + offset: self._base + offset + nbytes].view(t.dtype)
        return typed.as_strided(t.shape, t.stride(), typed.storage_offset() + t.storage_offset())

    def _scratch(self, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        return self._arena[self._base + offset: self._base + offset + nbytes].view(dtype).view(shape)

    def _bind(self, bucket: _Bucket, an: _Analysis, inputs: list[torch.Tensor]) -> None:
        plan = bucket.plan
        values: dict[torch.fx.Node, Any] = dict(an.params)
        for node, x, stage in zip(an.user_inputs, inputs, self._staging, strict=True):
            values[node] = stage[: x.numel()].view(x.shape)
            values[node].copy_(x)
        bucket.inputs = [values[n] for n in an.user_inputs]
        group_tensor: dict[int, torch.Tensor] = {}
        for gid, life in an.group_life.items():
            g = an.groups[gid]
            group_tensor[gid] = self._region(plan.offsets[life], _tensors(an.env[g.owner])[g.index])
        comps = {c.node: c for c in an.computes}
        counts = dict.fromkeys(("out_variant", "lowered", "in_place", "elided", "copied", "view", "constant"), 0)
        kernels: dict[torch.fx.Node, tuple[Kernel, list[torch.Tensor]]] = {}
        constant_storages: dict[int, int] = {}
        param_keys = {_storage_key(t) for t in an.params.values() if isinstance(t, torch.Tensor)}
        with torch.no_grad():
            for node, kind in an.kind.items():
                if kind == "noop":
                    continue
                if kind == "constant":
                    values[node] = an.env[node]
                    counts["constant"] += 1
                    for t in _tensors(an.env[node]):
                        if t is not None and _storage_key(t) not in param_keys:
                            constant_storages[_storage_key(t)] = t.untyped_storage().nbytes()
                    continue
                args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: values[n])
                if kind == "view":
                    values[node] = node.target(*args, **kwargs)
                    for got, want in zip(_tensors(values[node]), _tensors(an.env[node]), strict=True):
                        if got is not None and _layout(got) != _layout(want):
                            raise TraceError(f"{node.target} (node {node.name}) gives a different layout on the "
                                             "arena than eagerly", str(node.target))
                    counts["view"] += 1
                    continue
                comp = comps[node]
                eager_outs = _tensors(an.env[node])
                if comp.reuse is not None:
                    outs = [values[comp.reuse]]
                else:
                    outs = []
                    for i, t in enumerate(eager_outs):
                        g = an.slot_group.get((node, i))
                        if t is None:
                            outs.append(None)
                        elif g is None:  # empty: made once, here
                            outs.append(torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device))
                        else:
                            outs.append(group_tensor[g])
                values[node] = outs[0] if isinstance(an.env[node], torch.Tensor) else type(an.env[node])(outs)
                bucket.step_output_bytes[f"arena:{node.name}"] = {
                    n for t in eager_outs if t is not None for n in (t.numel() * t.element_size(), t.untyped_storage().nbytes())
                }
                if comp.elided:
                    counts["elided"] += 1
                    continue
                scratch = [self._scratch(plan.offsets[i], shape, dtype) for i, shape, dtype in comp.scratch]
                named = _by_name(node.target, args, kwargs)
                kernel, how = self._kernel(comp, named, args, kwargs, outs, scratch)
                restore = (lambda o=outs[0], e=an.env[comp.reuse]: o.copy_(e)) if comp.reuse is not None else None
                kernel = self._checked(node, kernel, outs, an, args, kwargs, how, restore)
                if kernel[1] != how:
                    how = kernel[1]
                kernels[node] = (kernel[0], outs)
                counts[how] += 1
                if comp.reuse is not None and how != "copied":
                    counts["in_place"] += 1
        bucket.steps = [(f"arena:{n.name}", k) for n, (k, _) in kernels.items()]
        bucket.constant_bytes = sum(constant_storages.values())
        bucket.counts = counts
        flat_out = list(an.out_node.args[0])
        bucket.outputs = [values[n] if isinstance(n, torch.fx.Node) else n for n in flat_out]
        bucket.out_spec = an.ep.call_spec.out_spec
        batch_syms, seq_syms = self._symbols(an)
        for n in flat_out:
            shape = n.meta["val"].shape if isinstance(n, torch.fx.Node) and isinstance(n.meta.get("val"), torch.Tensor) else ()
            bucket.out_batch.append(len(shape) > 0 and str(shape[0]) in batch_syms)
            bucket.out_seq.append(tuple(i for i, d in enumerate(shape) if str(d) in seq_syms))
        # Padding is only undone where the trace shows which output dimensions follow the
        # input's batch and sequence: a fixed-shape trace serves exact sizes only.
        bucket.pad_batch = bool(batch_syms) and all(bucket.out_batch)
        bucket.pad_seq = bool(seq_syms)

    def _symbols(self, an: _Analysis) -> tuple[set[str], set[str]]:
        batch, seq = set(), set()
        for node, has_seq in zip(an.user_inputs, self._seq_inputs(), strict=True):
            shape = node.meta["val"].shape
            if not isinstance(shape[0], int):
                batch.add(str(shape[0]))
            if has_seq and not isinstance(shape[self.config.seq_dim], int):
                seq.add(str(shape[self.config.seq_dim]))
        return batch, seq

    @staticmethod
    def _copy_kernel(op, args, kwargs, outs) -> Kernel:
        def run():
            result = op(*args, **kwargs)
            for o, r in zip(outs, _tensors(result), strict=False):
                if o is not None:
                    o.copy_(r)

        return run

    def _kernel(self, comp: _Compute, named: dict, args, kwargs, outs, scratch) -> tuple[Kernel, str]:
        node = comp.node
        if comp.lowering is not None:
            kernel = comp.lowering[1](named, outs, scratch)
            if kernel is not None:
                return kernel, "lowered"
        if comp.out_op is not None and None not in outs:
            out_op, names, native = comp.out_op
            call = dict(named)
            first = next((v for v in call.values() if isinstance(v, torch.Tensor)), None)
            for arg in node.target._schema.arguments:
                v = call.get(arg.name)
                if isinstance(arg.type, torch.TensorType) and isinstance(v, (int, float, bool)):
                    # In the dtype the kernel computes in, so it need not convert it per call.
                    call[arg.name] = _scalar(v, torch.result_type(first, v) if first is not None else
                                             torch.result_type(torch.tensor(v), v))
            call.update(zip(names, outs, strict=True))
            return (lambda: out_op(**call)), "out_variant" if native else "copied"
        return self._copy_kernel(node.target, args, kwargs, outs), "copied"

    def _checked(self, node, kernel: Kernel, outs, an: _Analysis, args, kwargs, how: str,
                 restore: Callable[[], object] | None) -> tuple[Kernel, str]:
        """Run the kernel on the eager inputs of its node and compare with the eager outputs;
        a kernel that disagrees is replaced by the ordinary operator plus a copy. The arena
        then holds the eager outputs, so each node is checked on exact inputs. ``restore``
        puts back an input the kernel wrote over."""
        expected = _tensors(an.env[node])
        random = isinstance(node.target, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in node.target.tags
        kernel()
        if not random and how != "copied" and not self._close(outs, expected):
            if restore is not None:  # the kernel wrote over its input: put the input back
                restore()
            kernel, how = self._copy_kernel(node.target, args, kwargs, outs), "copied"
            kernel()
            if not self._close(outs, expected):
                raise TraceError(f"{node.target} (node {node.name}) gives different results when rerun; "
                                 "its output cannot be planned", str(node.target))
        for o, e in zip(outs, expected, strict=True):
            if o is not None:
                o.copy_(e)
        return kernel, how

    def _close(self, outs, expected) -> bool:
        for o, e in zip(outs, expected, strict=True):
            if o is None or e is None:
                continue
            if o.dtype.is_floating_point or o.dtype.is_complex:
                if not torch.allclose(o, e, rtol=self.config.check_rtol, atol=self.config.check_atol, equal_nan=True):
                    return False
            elif not torch.equal(o, e):
                return False
        return True

    # running
    def bucket_for(self, batch: int, seq: int | None = None) -> tuple[int, int | None] | None:
        """The bucket ``(batch, seq)`` a request of that size runs in, or None."""
        b = next((x for x in self.config.batch_buckets if x >= batch), None)
        if b is None:
            return None
        if not self.config.seq_buckets:
            return (b, None)
        s = next((x for x in self.config.seq_buckets if seq is not None and x >= seq), None)
        return None if s is None else (b, s)

    def _select(self, inputs: Sequence[torch.Tensor]) -> _Bucket | None:
        if len(inputs) != len(self._dtypes):
            raise SlimkitError(f"the model was traced with {len(self._dtypes)} inputs, got {len(inputs)}")
        for i, (x, dt) in enumerate(zip(inputs, self._dtypes, strict=True)):
            if not isinstance(x, torch.Tensor) or x.dtype != dt:
                got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
                raise SlimkitError(f"input {i} is {got}; the model was traced with {dt}: convert it first")
        seq_inputs = self._seq_inputs()
        batch = inputs[0].shape[0] if inputs[0].dim() else 1
        seq = next((x.shape[self.config.seq_dim] for x, s in zip(inputs, seq_inputs, strict=True) if s), None)
        key = self.bucket_for(batch, seq)
        bucket = self._buckets.get(key) if key else None
        if bucket is None:
            return None
        for x, shape, has_seq in zip(inputs, bucket.input_shapes, seq_inputs, strict=True):
            want = list(shape)
            want[0] = batch
            if has_seq:
                want[self.config.seq_dim] = seq
            if list(x.shape) != want:
                return None
        if (batch != bucket.batch and not bucket.pad_batch) or (seq != bucket.seq and not bucket.pad_seq):
            return None
        return bucket

    def __call__(self, *inputs: torch.Tensor, copy: bool = True):
        """Run the model on ``inputs``.

        Args:
            inputs: the model's positional tensor inputs.
            copy: return outputs in fresh memory (True) or as arena views that the next
                call overwrites (False: nothing is allocated).
        """
        if self.fallback_reason is not None:
            with torch.no_grad():
                return self.module(*inputs)
        bucket = self._select(inputs)
        if bucket is None:
            shape = tuple(tuple(x.shape) for x in inputs)
            if shape not in self._warned:
                self._warned.add(shape)
                warnings.warn(f"input shapes {shape} fit no planned bucket (batch buckets "
                              f"{self.config.batch_buckets}, sequence buckets {self.config.seq_buckets}); "
                              "running this request eagerly", ArenaFallbackWarning, stacklevel=2)
            with torch.no_grad():
                return self.module(*inputs)
        batch = inputs[0].shape[0]
        seq_inputs = self._seq_inputs()
        d = self.config.seq_dim
        seq = None
        with torch.no_grad():
            for i, (x, stage, has_seq) in enumerate(zip(inputs, bucket.inputs, seq_inputs, strict=True)):
                if x.shape == stage.shape:
                    stage.copy_(x)
                    continue
                rows = stage[:batch]
                if has_seq:
                    seq = x.shape[d]
                    rows.narrow(d, 0, seq).copy_(x)
                    if seq < stage.shape[d]:
                        pads = self.config.pad_values
                        rows.narrow(d, seq, stage.shape[d] - seq).fill_(pads[i] if i < len(pads) else 0)
                else:
                    rows.copy_(x)
                if batch < stage.shape[0]:
                    stage[batch:].copy_(stage[:1].expand_as(stage[batch:]))
            if self._annotate:
                for name, kernel in bucket.steps:
                    with torch.profiler.record_function(name):
                        kernel()
            else:
                for _, kernel in bucket.steps:
                    kernel()
            outs = []
            for value, has_batch, seq_dims in zip(bucket.outputs, bucket.out_batch, bucket.out_seq, strict=True):
                if isinstance(value, torch.Tensor):
                    if has_batch and batch != bucket.batch:
                        value = value[:batch]
                    if seq is not None and seq != bucket.seq:
                        for sd in seq_dims:
                            value = value.narrow(sd, 0, seq)
                    if copy:
                        value = value.clone()
                outs.append(value)
        return pytree.tree_unflatten(outs, bucket.out_spec)

    def warm_up(self, rounds: int = 2) -> None:
        """Run every bucket ``rounds`` times on its example inputs, so that kernels set up
        whatever they cache before the first real request."""
        if self.fallback_reason is not None:
            return
        for bucket in self._buckets.values():
            inputs = self._bucket_inputs(bucket.batch, bucket.seq)
            for _ in range(rounds):
                self(*inputs, copy=False)

    def summary(self) -> dict:
        """Per bucket: lower bound, arena and no-reuse bytes, the strategy kept, and how
        operators were bound (out= overload, lowered, in place, copy elided, copied)."""
        if self.fallback_reason is not None:
            return {"fallback": self.fallback_reason, "buckets": []}
        return {
            "fallback": None,
            "arena_bytes": self.arena_bytes,
            "staging_bytes": self.staging_bytes,
            "buckets": [
                {"batch": b.batch, "seq": b.seq, "tensors": len(b.lives), **b.plan.to_dict(),
                 "without_reuse": {k: b.plain_plan.to_dict()[k] for k in ("lower_bound_bytes", "arena_bytes", "no_reuse_bytes")},
                 "constant_bytes": b.constant_bytes, "ops": dict(b.counts),
                 "pads_batch": b.pad_batch, "pads_seq": b.pad_seq}
                for b in self._buckets.values()
            ],
        }

    @property
    def buckets(self) -> list[tuple[int, int | None]]:
        return list(self._buckets)


def build_arena(
    model, example_inputs: Sequence[torch.Tensor] | None = None, config: ArenaConfig | None = None
) -> ArenaExecutor:
    """Trace ``model``, plan its activations into one arena per shape bucket, and return
    an executor that runs it there.

    Args:
        model: an ``nn.Module`` or a :class:`slimkit.zoo.models.LoadedModel`.
        example_inputs: the model's positional tensor inputs (default: the loaded model's
            ``example_inputs``). They give dtypes and non-batch shapes, and the values the
            kernels are checked on.
        config: buckets, alignment, strategy (default :class:`ArenaConfig`).

    A model the planner cannot trace runs eagerly behind the same interface, after an
    :class:`ArenaFallbackWarning` naming the operator; ``executor.fallback_reason`` says why.
    """
    module = getattr(model, "module", model)
    if example_inputs is None:
        example_inputs = getattr(model, "example_inputs", None)
    if not example_inputs:
        raise ConfigError("give example_inputs: the model's positional tensor inputs")
    return ArenaExecutor(module, example_inputs, config)


def count_allocations(executor: ArenaExecutor, inputs: Sequence[torch.Tensor], requests: int = 10,
                      warmup: int = 2) -> dict:
    """Count memory allocations per request in steady state with ``torch.profiler``.

    The executor runs ``warmup`` requests, then ``requests`` more under the profiler with
    each operator in a ``record_function`` range. An allocation inside an operator's range
    whose size is one of that operator's outputs is an **activation** allocation (the
    operator made its output instead of writing into the arena); any other allocation in
    an operator is **workspace**; allocations outside every operator (input copies,
    output slicing) are **other**.

    Returns:
        ``{"requests", "activation", "workspace", "other"}`` (allocations per request), the
        same as ``*_bytes``, and ``by_operator``: activation and workspace allocations
        per request of each node that allocated.
    """
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        executor(*inputs, copy=False)
    sizes: dict[str, set[int]] = {}
    if executor.fallback_reason is None:
        bucket = executor._select(inputs)
        sizes = bucket.step_output_bytes if bucket is not None else {}
    executor._annotate = True
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            for _ in range(requests):
                executor(*inputs, copy=False)
    finally:
        executor._annotate = False
    events = prof.profiler.kineto_results.events()
    ranges = sorted((e.start_ns(), e.end_ns(), e.name()) for e in events if e.name().startswith("arena:"))
    starts = [r[0] for r in ranges]
    counts = dict.fromkeys(("activation", "workspace", "other"), 0)
    nbytes = dict.fromkeys(counts, 0)
    by_op: dict[str, dict[str, int]] = {}
    for e in events:
        if e.name() != "[memory]" or e.nbytes() <= 0:
            continue
        t = e.start_ns()
        k = bisect.bisect_right(starts, t) - 1
        if k >= 0 and ranges[k][0] <= t <= ranges[k][1]:
            name = ranges[k][2]
            kind = "activation" if e.nbytes() in sizes.get(name, ()) else "workspace"
            per = by_op.setdefault(name[len("arena:"):], {"activation": 0, "workspace": 0})
            per[kind] += 1
        else:
            kind = "other"
        counts[kind] += 1
        nbytes[kind] += e.nbytes()
    return {"requests": requests, **{k: v / requests for k, v in counts.items()},
            **{f"{k}_bytes": v / requests for k, v in nbytes.items()},
            "by_operator": {k: {kind: n / requests for kind, n in v.items()} for k, v in sorted(by_op.items())}}
