"""Lowerings: operators bound to kernels that write into arena views (linear as ``addmm``,
1x1, im2col and depthwise convolutions, batch and layer norm, attention, embedding,
copies, means, relu), and the lookup of an operator's ``out=`` overload."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

aten = torch.ops.aten
Kernel = Callable[[], None]

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
