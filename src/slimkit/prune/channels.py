"""Which channels must be removed together, and removing them.

Structured pruning removes whole channels, and a channel is shared: a convolution's
output channel ``c`` is also channel ``c`` of the batch norm after it, an input channel of
the next convolution, and, through a residual addition, of every layer that writes to or
reads from the same stream. :func:`channel_groups` traces the model with ``torch.fx`` and
follows every tensor's channel axis through the graph to find these *channel groups*;
:func:`shrink_` then slices every tied parameter and buffer so that the model becomes a
smaller dense model.

The analysis is conservative: an operation it does not understand, a grouped
convolution, or a channel that reaches the model's input or output makes the groups
involved non-prunable, with the reason recorded on the group. It never guesses.
"""

from __future__ import annotations

import math
import operator
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import fx, nn

from slimkit.config import LayerSelector
from slimkit.errors import ConfigError, SlimkitError
from slimkit.layers import select_names
from slimkit.modes import eval_mode

Role = Literal["out", "in", "norm", "depthwise"]


class UntraceableModel(SlimkitError):
    """``torch.fx`` could not trace the model; the message names the module that failed."""


@dataclass(frozen=True)
class Member:
    """One place where a channel group's channels live.

    Attributes:
        module: qualified name of the module.
        role: ``out`` (output channels of a Conv/Linear: weight dimension 0 and bias),
            ``in`` (input channels of a Conv/Linear: weight dimension 1), ``norm`` (a batch
            norm's weight, bias and running statistics), ``depthwise`` (a depthwise
            convolution, whose input and output channels are the same channels).
        offset: where the group's channels start along the module's dimension (non-zero
            when the module reads a concatenation).
        block: consecutive features per channel; a ``[C, H, W]`` map flattened into a
            Linear gives each channel ``H * W`` input features.
        extent: the module's size along that dimension when the model was analysed.
    """

    module: str
    role: Role
    offset: int
    block: int
    extent: int

    @property
    def dim(self) -> int:
        """The dimension of the module's weight that the group slices."""
        return 1 if self.role == "in" else 0


@dataclass(eq=False)
class ChannelGroup:
    """Channels that must be kept or removed together, wherever they appear.

    Channel ``i`` of the group is index ``offset + i`` (times ``block``) of every member.
    Groups hash by identity, so they can key the ``keep`` mapping of :func:`shrink_`.

    Attributes:
        index: position in the list :func:`channel_groups` returned.
        size: number of channels.
        members: every module dimension that holds these channels.
        reasons: why the group cannot be pruned; empty when it can.
    """

    index: int
    size: int
    members: tuple[Member, ...]
    reasons: tuple[str, ...] = ()

    @property
    def prunable(self) -> bool:
        """Whether :func:`shrink_` may remove channels of this group."""
        return not self.reasons

    @property
    def producers(self) -> tuple[Member, ...]:
        """Members whose filters compute the channels (``out`` and ``depthwise``)."""
        return tuple(m for m in self.members if m.role in ("out", "depthwise"))

    def __repr__(self) -> str:
        names = ", ".join(f"{m.module}[{m.role}{f'@{m.offset}' if m.offset else ''}]" for m in self.members[:6])
        more = f", +{len(self.members) - 6}" if len(self.members) > 6 else ""
        state = "prunable" if self.prunable else f"fixed: {self.reasons[0]}"
        return f"ChannelGroup(#{self.index}, {self.size} channels, {state}; {names}{more})"


# -- what the analysis understands ----------------------------------------------------

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# Modules that act on each channel separately and have no per-channel parameters.
_PASS_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid,
    nn.Tanh, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Hardtanh, nn.Softplus, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
)
# Functions and tensor methods of the same kind, by name (torch.*, F.*, x.method()).
_PASS_OPS = {
    "relu", "relu_", "relu6", "gelu", "silu", "mish", "hardswish", "hardsigmoid", "sigmoid",
    "sigmoid_", "tanh", "tanh_", "leaky_relu", "elu", "selu", "celu", "hardtanh", "softplus",
    "clamp", "clamp_", "clamp_min", "clamp_max", "clip", "abs", "neg", "exp", "square",
    "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
    "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
    "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d", "interpolate",
    "contiguous", "clone", "detach", "float", "half", "bfloat16", "to",
}
_ELEMENTWISE = {"add", "sub", "mul", "truediv", "div", "iadd", "isub", "imul", "itruediv", "add_", "sub_", "mul_", "div_"}
_REDUCE = {"mean", "sum", "amax", "amin"}
_RESHAPE = {"view", "reshape"}
_CAT = {"cat", "concat", "concatenate"}
# Ops that read only a tensor's shape or type: they do not constrain its channels.
_SHAPE_ONLY = {"size", "dim", "numel", "getattr"}


@dataclass(frozen=True)
class _Seg:
    group: int
    size: int
    block: int


@dataclass(frozen=True)
class _Chan:
    """Which channel groups make up axis ``dim`` of a tensor, in order."""

    dim: int
    segs: tuple[_Seg, ...]


# -- tracing --------------------------------------------------------------------------

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
    return _trace(model, _excluded(model, exclude))


def _trace(model: nn.Module, leaves: set[str]) -> fx.GraphModule:
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


def _excluded(model: nn.Module, exclude: Iterable[str]) -> set[str]:
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


def _record_shapes(model: nn.Module, gm: fx.GraphModule, inputs: tuple) -> dict[fx.Node, tuple[int, ...]]:
    # Eval mode so that batch norm does not update its running statistics, and dropout
    # does not draw; the traced graph is the same in both modes.
    with eval_mode(model):
        try:
            recorder = _ShapeRecorder(gm)
            with torch.no_grad():
                recorder.run(*inputs)
        except Exception as e:
            # Name the original error: it may be a bug in the model rather than a bad input.
            lines = str(e).strip().splitlines()
            what = f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
            raise ConfigError(f"example_input: the model fails on it ({what}); give an input the model accepts") from e
    return recorder.shapes


# -- the analysis ---------------------------------------------------------------------

def channel_groups(model: nn.Module, example_input: torch.Tensor | tuple, exclude: Iterable[str] = ()) -> list[ChannelGroup]:
    """The model's channel groups: module dimensions whose channels must change together.

    Follows each tensor's channel axis (dimension 1 of convolution maps, the last
    dimension of Linear features) from producers (Conv/Linear outputs) through batch
    norms, depthwise convolutions, activations, pooling, dropout, residual additions and
    multiplications, concatenation, flattening (a channel becomes a block of features)
    and reductions over other dimensions, to consumers (Conv/Linear inputs).

    A group is non-prunable, with the reason in ``group.reasons``, when its channels reach
    the model's input or output, pass a grouped convolution or an excluded module, or
    meet an operation the analysis does not understand.

    Args:
        model: the model; it is not modified (batch norm statistics included).
        example_input: a tensor, or a tuple of positional inputs, that the model accepts;
            it fixes the shapes, e.g. how many features a flattened channel gives.
        exclude: qualified module names (or ``re:`` regexes) kept as opaque leaves: not
            traced into and never resized. Use it for modules torch.fx cannot trace.

    Returns:
        The groups, in graph order.

    Raises:
        UntraceableModel: torch.fx cannot trace the model (the message names the module).
        LayerSelectionError: a pattern in ``exclude`` matches no module.
        ConfigError: the model fails on ``example_input``.
    """
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    leaves = _excluded(model, exclude)
    gm = _trace(model, leaves)
    shapes = _record_shapes(model, gm, inputs)
    return _Analysis(model, gm, shapes, leaves).run()


class _Analysis:
    def __init__(self, model: nn.Module, gm: fx.GraphModule, shapes: dict[fx.Node, tuple[int, ...]], leaves: set[str]):
        self.model, self.gm, self.shapes, self.leaves = model, gm, shapes, leaves
        self.parent: list[int] = []
        self.size: list[int] = []
        self.members: list[list[Member]] = []
        self.reasons: list[list[str]] = []
        self.chan: dict[fx.Node, _Chan | None] = {}
        self.calls: dict[str, tuple[_Chan | None, _Chan | None]] = {}

    # union-find over groups ---------------------------------------------------------
    def new(self, size: int, member: Member | None = None, reason: str | None = None) -> int:
        g = len(self.parent)
        self.parent.append(g)
        self.size.append(size)
        self.members.append([member] if member else [])
        self.reasons.append([reason] if reason else [])
        return g

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a == b:
            return
        assert self.size[a] == self.size[b], (self.size[a], self.size[b])
        a, b = min(a, b), max(a, b)
        self.parent[b] = a
        self.members[a] += self.members[b]
        self.reasons[a] += [r for r in self.reasons[b] if r not in self.reasons[a]]

    def fix(self, chan: _Chan | None, reason: str) -> None:
        """Make every group of ``chan`` non-prunable, for ``reason``."""
        for s in chan.segs if chan else ():
            reasons = self.reasons[self.find(s.group)]
            if reason not in reasons:
                reasons.append(reason)

    def add(self, chan: _Chan, module: str, role: Role, extent: int) -> None:
        offset = 0
        for s in chan.segs:
            self.members[self.find(s.group)].append(Member(module, role, offset, s.block, extent))
            offset += s.size * s.block

    def unify(self, a: _Chan, b: _Chan, reason: str) -> bool:
        """Tie the channels of ``a`` and ``b`` one to one; if they are split differently, fix both."""
        if [(s.size, s.block) for s in a.segs] != [(s.size, s.block) for s in b.segs]:
            self.fix(a, reason)
            self.fix(b, reason)
            return False
        for x, y in zip(a.segs, b.segs, strict=True):
            self.union(x.group, y.group)
        return True

    # walking the graph ---------------------------------------------------------------
    def run(self) -> list[ChannelGroup]:
        for node in self.gm.graph.nodes:
            chan = self.visit(node)
            if chan is not None and not self._consistent(node, chan):
                self.fix(chan, f"internal: the channel bookkeeping does not match the shape at {self.where(node)}")
            self.chan[node] = chan
        roots: dict[int, list[int]] = defaultdict(list)
        for g in range(len(self.parent)):
            roots[self.find(g)].append(g)
        groups = []
        for root in sorted(roots):
            if self.members[root]:
                members = tuple(dict.fromkeys(self.members[root]))  # a module called twice is listed once
                groups.append(ChannelGroup(len(groups), self.size[root], members, tuple(self.reasons[root])))
        return groups

    def _consistent(self, node: fx.Node, chan: _Chan) -> bool:
        shape = self.shapes.get(node)
        return shape is not None and 0 <= chan.dim < len(shape) and shape[chan.dim] == sum(s.size * s.block for s in chan.segs)

    def where(self, node: fx.Node) -> str:
        if node.op == "call_module":
            return f"module {node.target!r} ({type(self.model.get_submodule(node.target)).__name__})"
        stack = node.meta.get("nn_module_stack") or {}
        inside = list(stack.values())[-1][0] if stack else ""
        return f"{_op_name(node)}{f' in {inside!r}' if inside else ''}"

    def opaque(self, node: fx.Node, what: str | None = None) -> None:
        what = what or f"{self.where(node)}, which the channel analysis does not follow"
        for n in node.all_input_nodes:
            self.fix(self.chan.get(n), f"they flow into {what}")
        return None

    def visit(self, node: fx.Node) -> _Chan | None:
        if node.op == "placeholder":
            shape = self.shapes.get(node)
            if shape is None or len(shape) < 2:
                return None
            return _Chan(1, (_Seg(self.new(shape[1], reason="they are the model's input channels"), shape[1], 1),))
        if node.op == "get_attr":
            return None
        if node.op == "output":
            for n in node.all_input_nodes:
                self.fix(self.chan.get(n), "they reach the model's output")
            return None
        if node.op == "call_module":
            return self.module(node)
        return self.function(node)

    def module(self, node: fx.Node) -> _Chan | None:
        name = str(node.target)
        m = self.model.get_submodule(name)
        if name in self.leaves:
            return self.opaque(node, f"the excluded module {name!r}")
        x = self.chan.get(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
        kind = type(m)
        if kind in _CONV or kind is nn.Linear or kind in _NORM:
            if len(node.all_input_nodes) != 1:
                return self.opaque(node)
            if name in self.calls:  # the same weights used again: both calls' channels are tied
                before, out = self.calls[name]
                if before is not None and x is not None:
                    self.unify(before, x, f"{name} is called on inputs split differently")
                elif before is not None or x is not None:
                    reason = f"{name} is called again on an input the analysis cannot follow"
                    self.fix(before, reason)
                    self.fix(x, reason)
                return out if kind not in _NORM else before
            if kind in _CONV:
                out = self.conv(name, m, x)
            elif kind is nn.Linear:
                out = self.linear(node, name, m, x)
            else:
                out = self.norm(name, m, x)
            self.calls[name] = (x, out)
            return out
        if kind is nn.Flatten:
            return self.flatten(node, x, m.start_dim, m.end_dim)
        if kind in _PASS_MODULES:
            return self.passthrough(node, x)
        return self.opaque(node)

    def produce(self, name: str, size: int, dim: int, role: Role = "out", reason: str | None = None) -> _Chan:
        """A new group of ``size`` channels written by module ``name``, on axis ``dim``."""
        return _Chan(dim, (_Seg(self.new(size, Member(name, role, 0, 1, size), reason), size, 1),))

    def conv(self, name: str, m: nn.Conv2d, x: _Chan | None) -> _Chan:
        if x is not None and (x.dim != 1 or any(s.block != 1 for s in x.segs)):
            self.fix(x, f"{name} reads them on a dimension that is not its channel dimension")
            x = None
        if m.groups == 1:
            if x is not None:
                self.add(x, name, "in", m.in_channels)
            return self.produce(name, m.out_channels, 1)
        if m.groups == m.in_channels == m.out_channels:
            if x is not None:
                self.add(x, name, "depthwise", m.out_channels)
                return x
            reason = f"the depthwise convolution {name} reads them from an op the analysis does not follow"
            return self.produce(name, m.out_channels, 1, "depthwise", reason)
        reason = f"they pass the grouped convolution {name!r} (groups={m.groups}), whose channels are not pruned"
        self.fix(x, reason)
        return self.produce(name, m.out_channels, 1, reason=reason)

    def linear(self, node: fx.Node, name: str, m: nn.Linear, x: _Chan | None) -> _Chan:
        rank = len(self.shapes[node])
        if x is not None and x.dim != rank - 1:
            self.fix(x, f"{name} reads them on a dimension that is not its feature dimension")
            x = None
        if x is not None:
            self.add(x, name, "in", m.in_features)
        return self.produce(name, m.out_features, rank - 1)

    def norm(self, name: str, m: nn.BatchNorm2d, x: _Chan | None) -> _Chan | None:
        if x is None:
            return None
        if x.dim != 1 or any(s.block != 1 for s in x.segs):
            self.fix(x, f"{name} normalises a dimension that is not their channel dimension")
            return None
        self.add(x, name, "norm", m.num_features)
        return x

    def passthrough(self, node: fx.Node, x: _Chan | None) -> _Chan | None:
        tensors = [n for n in node.all_input_nodes if n in self.shapes]
        if x is None or len(tensors) != 1:
            return self.opaque(node)
        source, out = self.shapes[tensors[0]], self.shapes.get(node)
        if out is None or len(out) != len(source) or out[x.dim] != source[x.dim]:
            return self.opaque(node)
        return x

    def function(self, node: fx.Node) -> _Chan | None:
        name = _op_name(node)
        inputs = [self.chan.get(n) for n in node.all_input_nodes]
        if all(c is None for c in inputs):
            return None  # nothing tracked flows in
        first = node.args[0] if node.args else None
        x = self.chan.get(first) if isinstance(first, fx.Node) else None
        if name in _SHAPE_ONLY and node not in self.shapes:
            return None
        if name in _PASS_OPS:
            return self.passthrough(node, x)
        if name in _ELEMENTWISE:
            return self.elementwise(node)
        if name == "flatten":
            start = _arg(node, 1, "start_dim", 0)
            end = _arg(node, 2, "end_dim", -1)
            return self.flatten(node, x, start, end)
        if name in _RESHAPE:
            return self.reshape(node, x)
        if name in _REDUCE:
            return self.reduce(node, x)
        if name in _CAT:
            return self.cat(node)
        return self.opaque(node)

    def elementwise(self, node: fx.Node) -> _Chan | None:
        operands = [a for a in node.args[:2] if isinstance(a, fx.Node) and a in self.shapes]
        out = self.shapes.get(node)
        if out is None:
            return self.opaque(node)
        tracked = []
        for a in operands:
            c = self.chan.get(a)
            if c is None:
                continue
            from_right = len(self.shapes[a]) - c.dim
            broadcast = self.shapes[a][c.dim] == 1 and out[len(out) - from_right] != 1
            tracked.append((a, c, from_right, broadcast))
        full = [t for t in tracked if not t[3]]
        if not full:
            return self.opaque(node)
        _, chan, from_right, _ = full[0]
        for a in operands:
            c = self.chan.get(a)
            if c is not None:
                continue
            axis = len(self.shapes[a]) - from_right
            if axis >= 0 and self.shapes[a][axis] != 1:
                return self.opaque(node, f"{self.where(node)} with a tensor the analysis cannot follow ({a.name})")
        for _, c, k, _ in full[1:]:
            if k != from_right:
                return self.opaque(node, f"{self.where(node)} of tensors whose channels are on different dimensions")
            self.unify(chan, c, f"{self.where(node)} combines tensors whose channels were concatenated differently")
        return _Chan(len(out) - from_right, chan.segs)

    def flatten(self, node: fx.Node, x: _Chan | None, start: int, end: int) -> _Chan | None:
        shape = self.shapes.get(self.args_tensor(node))
        if x is None or shape is None or node not in self.shapes:
            return self.opaque(node)
        rank = len(shape)
        start, end = start % rank, end % rank
        if x.dim < start:
            return x
        if x.dim > end:
            return _Chan(x.dim - (end - start), x.segs)
        if math.prod(shape[start:x.dim]) != 1:
            return self.opaque(node, f"{self.where(node)}, which merges their channels with an outer dimension")
        inner = math.prod(shape[x.dim + 1 : end + 1])
        return _Chan(start, tuple(_Seg(s.group, s.size, s.block * inner) for s in x.segs))

    def reshape(self, node: fx.Node, x: _Chan | None) -> _Chan | None:
        target = list(node.args[1:])
        if len(target) == 1 and isinstance(target[0], (tuple, list)):
            target = list(target[0])
        # Only the flattening idiom x.view(x.size(0), -1) is safe: the -1 follows the
        # channel count after shrinking, a literal size would not.
        if x is not None and x.dim == 1 and len(target) == 2 and target[1] == -1:
            return self.flatten(node, x, 1, -1)
        return self.opaque(
            node, f"{self.where(node)} to {target} (write x.flatten(1) or x.view(x.size(0), -1) so the shape follows the channels)"
        )

    def reduce(self, node: fx.Node, x: _Chan | None) -> _Chan | None:
        shape = self.shapes.get(self.args_tensor(node))
        dims = _arg(node, 1, "dim", None)
        keepdim = _arg(node, 2, "keepdim", False)
        if x is None or shape is None or dims is None or node not in self.shapes:
            return self.opaque(node)
        dims = {d % len(shape) for d in (dims if isinstance(dims, (tuple, list)) else [dims])}
        if x.dim in dims:
            return self.opaque(node, f"{self.where(node)}, which reduces over their channels")
        return _Chan(x.dim if keepdim else x.dim - sum(d < x.dim for d in dims), x.segs)

    def cat(self, node: fx.Node) -> _Chan | None:
        tensors = _arg(node, 0, "tensors", None)
        out = self.shapes.get(node)
        if not isinstance(tensors, (list, tuple)) or out is None or not all(isinstance(t, fx.Node) and t in self.shapes for t in tensors):
            return self.opaque(node)
        dim = _arg(node, 1, "dim", 0) % len(out)
        chans = [self.chan.get(t) for t in tensors]
        if any(c is not None and c.dim == dim for c in chans):
            segs: list[_Seg] = []
            for t, c in zip(tensors, chans, strict=True):
                if c is not None and c.dim == dim:
                    segs += c.segs
                    continue
                reason = f"{self.where(node)} joins them with channels the analysis cannot follow ({t.name})"
                self.fix(c, reason)
                size = self.shapes[t][dim]
                segs.append(_Seg(self.new(size, reason=reason), size, 1))
            return _Chan(dim, tuple(segs))
        tracked = [c for c in chans if c is not None]
        if len(tracked) != len(chans) or len({c.dim for c in tracked}) != 1:
            return self.opaque(node)
        for c in tracked[1:]:
            self.unify(tracked[0], c, f"{self.where(node)} joins tensors whose channels were concatenated differently")
        return tracked[0]

    def args_tensor(self, node: fx.Node) -> fx.Node | None:
        first = node.args[0] if node.args else None
        return first if isinstance(first, fx.Node) else None


def _op_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return str(node.target)
    target = node.target
    if target is getattr:
        return "getattr"
    module = getattr(target, "__module__", "") or ""
    name = getattr(target, "__name__", str(target))
    if module.startswith("torch") or module in ("_operator", "operator") or target in vars(operator).values():
        return name
    return f"{module}.{name}" if module else name


def _arg(node: fx.Node, position: int, keyword: str, default: Any) -> Any:
    if len(node.args) > position:
        return node.args[position]
    return node.kwargs.get(keyword, default)


# -- shrinking ------------------------------------------------------------------------

def shrink_(model: nn.Module, keep: Mapping[ChannelGroup, torch.Tensor | Sequence[int]]) -> list[str]:
    """Keep only the channels ``keep[group]`` of each group, slicing every member in place.

    Weights, biases, batch-norm statistics and the modules' sizes (``in_channels``,
    ``out_channels``, ``groups`` of depthwise convolutions, ``in_features``,
    ``out_features``, ``num_features``) all shrink, so the result is a smaller dense
    model. Parameters are replaced by new ones: create optimizers afterwards.

    Args:
        model: the model :func:`channel_groups` analysed, not shrunk since.
        keep: for each group to shrink, the indices of the channels to keep (any order;
            at least one). Groups not in ``keep`` are left whole.

    Returns:
        The qualified names of the modules that changed, sorted.

    Raises:
        ConfigError: every problem at once: a group that is not prunable (with its
            reasons), indices out of range, repeated or empty, or groups from an older
            analysis of the model (analyse it again after shrinking).
    """
    problems: list[str] = []
    plans: dict[tuple[str, str], list[tuple[int, int, int, torch.Tensor]]] = defaultdict(list)
    modules = dict(model.named_modules())
    for group, indices in keep.items():
        label = f"group #{group.index} ({group.size} channels)"
        if not group.prunable:
            problems.append(f"{label} cannot be shrunk: {'; '.join(group.reasons)}")
            continue
        idx = torch.as_tensor(indices).flatten()
        if idx.numel() == 0 or idx.dtype.is_floating_point or idx.dtype == torch.bool:
            problems.append(f"{label}: give at least one integer channel index to keep, got {indices!r}")
            continue
        idx = idx.long().cpu()
        if idx.min() < 0 or idx.max() >= group.size or len(idx.unique()) != len(idx):
            problems.append(f"{label}: indices must be distinct and between 0 and {group.size - 1}, got {idx.tolist()[:8]}")
            continue
        for m in group.members:
            module = modules.get(m.module)
            if module is None or _extent(module, m.role) != m.extent:
                problems.append(
                    f"{label}: {m.module} no longer has {m.extent} {'inputs' if m.role == 'in' else 'outputs'}; "
                    "the groups come from an older analysis, run channel_groups again on the current model"
                )
                break
            plans[(m.module, m.role)].append((m.offset, m.block, group.size, idx.sort().values))
    if problems:
        raise ConfigError(problems)
    changed = set()
    with torch.no_grad():
        for (name, role), parts in plans.items():
            module = modules[name]
            extent = _extent(module, role)
            mask = torch.ones(extent, dtype=torch.bool)
            for offset, block, size, idx in parts:
                mask[offset : offset + size * block] = False
                mask[(offset + idx[:, None] * block + torch.arange(block)).flatten()] = True
            if bool(mask.all()):
                continue
            _slice(module, role, mask.nonzero().flatten())
            changed.add(name)
    return sorted(changed)


def _extent(module: nn.Module, role: Role) -> int:
    if isinstance(module, _NORM):
        return module.num_features
    if isinstance(module, nn.Linear):
        return module.in_features if role == "in" else module.out_features
    return module.in_channels if role == "in" else module.out_channels


def _slice(module: nn.Module, role: Role, index: torch.Tensor) -> None:
    n = len(index)
    if role == "in":
        _replace(module, "weight", 1, index)
        if isinstance(module, nn.Linear):
            module.in_features = n
        else:
            module.in_channels = n
        return
    names = ("weight", "bias", "running_mean", "running_var") if isinstance(module, _NORM) else ("weight", "bias")
    for attr in names:
        _replace(module, attr, 0, index)
    if isinstance(module, _NORM):
        module.num_features = n
    elif isinstance(module, nn.Linear):
        module.out_features = n
    else:
        module.out_channels = n
        if role == "depthwise":
            module.in_channels = module.groups = n


def _replace(module: nn.Module, attr: str, dim: int, index: torch.Tensor) -> None:
    old = getattr(module, attr, None)
    if old is None:
        return
    new = old.detach().index_select(dim, index.to(old.device)).clone()
    if isinstance(old, nn.Parameter):
        setattr(module, attr, nn.Parameter(new, requires_grad=old.requires_grad))
    else:
        setattr(module, attr, new)
