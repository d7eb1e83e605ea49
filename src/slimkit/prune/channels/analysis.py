"""Finding channel groups: following every tensor's channel axis through the traced graph."""

from __future__ import annotations

import math
import operator
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from slimkit.prune.channels.groups import ChannelGroup, Member, Role
from slimkit.prune.channels.ops import (
    BROADCAST_AS,
    CAT,
    CONV_TYPES,
    ELEMENTWISE,
    NORM_TYPES,
    PASS_MODULES,
    PASS_OPS,
    REDUCE,
    RESHAPE,
    SHAPE_ONLY,
    SQUEEZE,
    UNSQUEEZE,
    arg,
    op_name,
)
from slimkit.prune.channels.ties import Ties
from slimkit.prune.channels.tracing import excluded_modules, record_shapes, trace_with_leaves


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


def channel_groups(model: nn.Module, example_input: torch.Tensor | tuple, exclude: Iterable[str] = ()) -> list[ChannelGroup]:
    """The model's channel groups: module dimensions whose channels must change together.

    Follows each tensor's channel axis (dimension 1 of convolution maps, the last
    dimension of Linear features) from producers (Conv/Linear outputs) through batch
    norms, depthwise convolutions, activations, pooling, dropout, residual additions and
    multiplications, concatenation, flattening (a channel becomes a block of features),
    reshapes that only add or remove size-1 axes (``y.view(b, c, 1, 1)``, ``unsqueeze``,
    ``y[:, :, None, None]``, as in squeeze-excitation) and reductions over other
    dimensions, to consumers (Conv/Linear inputs).

    A group is non-prunable, with the reason in ``group.reasons``, when its channels reach
    the model's input or output, pass a grouped convolution or an excluded module, meet
    an operation the analysis does not understand, or live in a tied weight (a tensor
    that another module holds too, or that forward reads directly).

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
    return analyse(model, example_input, exclude).groups


@dataclass(frozen=True)
class ModuleCall:
    """One call of a module in the traced graph, in call order."""

    module: str
    node: str
    input: str | None
    source: str


@dataclass
class Analysis:
    """What :func:`analyse` learnt about a model on the way to its channel groups.

    Attributes:
        groups: the channel groups, as :func:`channel_groups` returns them.
        shapes: the shape of every traced tensor, by graph node name.
        layout: for every tensor that carries channel groups, its channel axis and the
            groups along it, in order, as ``(group index, channels, block)``; the group
            index is ``None`` for channels no module holds (never pruned).
        calls: the module calls of the graph, in the order forward makes them.
        outputs: the shapes of the tensors in the model's output.
    """

    groups: list[ChannelGroup]
    shapes: dict[str, tuple[int, ...]]
    layout: dict[str, tuple[int, tuple[tuple[int | None, int, int], ...]]]
    calls: list[ModuleCall]
    outputs: list[tuple[int, ...]]

    def expected_shape(self, node: str, kept: Mapping[int, int]) -> tuple[int, ...] | None:
        """The shape of tensor ``node`` once each group ``i`` keeps ``kept.get(i)`` channels."""
        shape = self.shapes.get(node)
        if shape is None or node not in self.layout:
            return shape
        dim, segs = self.layout[node]
        size = sum(kept.get(g, n) * block for g, n, block in segs)
        return (*shape[:dim], size, *shape[dim + 1 :])


def analyse(model: nn.Module, example_input: torch.Tensor | tuple, exclude: Iterable[str] = ()) -> Analysis:
    """:func:`channel_groups`, with the shapes and channel layout of every traced tensor."""
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    leaves = excluded_modules(model, exclude)
    gm = trace_with_leaves(model, leaves)
    shapes, outputs = record_shapes(model, gm, inputs)
    return _Analysis(model, gm, shapes, leaves).run(outputs)


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
            reason = f"{reason} ({_split(a)} and {_split(b)} channels)"
            self.fix(a, reason)
            self.fix(b, reason)
            return False
        for x, y in zip(a.segs, b.segs, strict=True):
            self.union(x.group, y.group)
        return True

    # walking the graph ---------------------------------------------------------------
    def run(self, outputs: list[tuple[int, ...]]) -> Analysis:
        for node in self.gm.graph.nodes:
            chan = self.visit(node)
            if chan is not None and not self._consistent(node, chan):
                self.fix(chan, f"internal: the channel bookkeeping does not match the shape at {self.where(node)}")
            self.chan[node] = chan
        roots: dict[int, list[int]] = defaultdict(list)
        for g in range(len(self.parent)):
            roots[self.find(g)].append(g)
        ties = Ties(self.model, self.gm, self.leaves)
        groups: list[ChannelGroup] = []
        index: dict[int, int] = {}
        for root in sorted(roots):
            if self.members[root]:
                members = tuple(dict.fromkeys(self.members[root]))  # a module called twice is listed once
                reasons = list(dict.fromkeys([*self.reasons[root], *ties.reasons(members)]))
                index[root] = len(groups)
                groups.append(ChannelGroup(len(groups), self.size[root], members, tuple(reasons)))
        layout = {
            node.name: (chan.dim, tuple((index.get(self.find(s.group)), s.size, s.block) for s in chan.segs))
            for node, chan in self.chan.items()
            if chan is not None
        }
        calls = []
        for node in self.gm.graph.nodes:
            if node.op == "call_module":
                source = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
                calls.append(ModuleCall(str(node.target), node.name, source and source.name, self.where(source) if source else ""))
        shapes = {node.name: shape for node, shape in self.shapes.items()}
        return Analysis(groups, shapes, layout, calls, outputs)

    def _consistent(self, node: fx.Node, chan: _Chan) -> bool:
        shape = self.shapes.get(node)
        return shape is not None and 0 <= chan.dim < len(shape) and shape[chan.dim] == sum(s.size * s.block for s in chan.segs)

    def where(self, node: fx.Node) -> str:
        if node.op == "placeholder":
            return f"the model's input {node.target!r}"
        if node.op == "get_attr":
            return f"the attribute {node.target!r}"
        if node.op == "call_module":
            return f"module {node.target!r} ({type(self.model.get_submodule(node.target)).__name__})"
        stack = node.meta.get("nn_module_stack") or {}
        inside = list(stack.values())[-1][0] if stack else ""
        return f"{op_name(node)}{f' in {inside!r}' if inside else ''}"

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
        if kind in CONV_TYPES or kind is nn.Linear or kind in NORM_TYPES:
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
                return out if kind not in NORM_TYPES else before
            if kind in CONV_TYPES:
                out = self.conv(name, m, x)
            elif kind is nn.Linear:
                out = self.linear(node, name, m, x)
            else:
                out = self.norm(name, m, x)
            self.calls[name] = (x, out)
            return out
        if kind is nn.Flatten:
            return self.flatten(node, x, m.start_dim, m.end_dim)
        if kind in PASS_MODULES:
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
        name = op_name(node)
        inputs = [self.chan.get(n) for n in node.all_input_nodes]
        if all(c is None for c in inputs):
            return None  # nothing tracked flows in
        first = node.args[0] if node.args else None
        x = self.chan.get(first) if isinstance(first, fx.Node) else None
        if name in SHAPE_ONLY and node not in self.shapes:
            return None
        if name in PASS_OPS:
            return self.passthrough(node, x)
        if name in ELEMENTWISE:
            return self.elementwise(node)
        if name == "flatten":
            start = arg(node, 1, "start_dim", 0)
            end = arg(node, 2, "end_dim", -1)
            return self.flatten(node, x, start, end)
        if name in RESHAPE:
            return self.reshape(node, x)
        if name in UNSQUEEZE:
            return self.unsqueeze(node, x)
        if name in SQUEEZE:
            return self.squeeze(node, x)
        if name == "getitem":
            return self.index(node, x)
        if name in BROADCAST_AS:
            return self.elementwise(node)
        if name in REDUCE:
            return self.reduce(node, x)
        if name in CAT:
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
        # The flattening idiom x.view(x.size(0), -1): the -1 follows the channel count
        # after shrinking, a literal size would not.
        if x is not None and x.dim == 1 and len(target) == 2 and target[1] == -1:
            return self.flatten(node, x, 1, -1)
        refused = (
            f"{self.where(node)} to {target} (write x.flatten(1) or x.view(x.size(0), -1), or size the "
            "channel axis by -1 or x.size(1), so the shape follows the channels)"
        )
        source, out = self.shapes.get(self.args_tensor(node)), self.shapes.get(node)
        dim = _singleton_map(source, out, x.dim) if x is not None and source and out else None
        if dim is None or len(target) != len(out):
            return self.opaque(node, refused)
        # Adding or removing size-1 dimensions, as squeeze-excitation does with
        # y.view(b, c, 1, 1): the channel entry must follow the channel count (-1, or
        # the size of a tensor with the same channels), the others must not depend on it.
        follows: list[_Chan] = []
        for i, t in enumerate(target):
            axis = self.size_source(t)
            chan = self.chan.get(axis[0]) if axis else None
            reads_channels = chan is not None and chan.dim == axis[1]
            if i == dim:
                if reads_channels:
                    follows.append(chan)
                elif not (isinstance(t, int) and t == -1):
                    return self.opaque(node, refused)
            elif not isinstance(t, int) and (axis is None or reads_channels):
                return self.opaque(node, refused)
        for other in follows:
            self.unify(x, other, f"{self.where(node)} sizes them by a tensor whose channels were concatenated differently")
        return _Chan(dim, x.segs)

    def unsqueeze(self, node: fx.Node, x: _Chan | None) -> _Chan | None:
        source, d = self.shapes.get(self.args_tensor(node)), arg(node, 1, "dim", None)
        if x is None or source is None or not isinstance(d, int):
            return self.opaque(node)
        d %= len(source) + 1
        return _Chan(x.dim + (d <= x.dim), x.segs)

    def squeeze(self, node: fx.Node, x: _Chan | None) -> _Chan | None:
        source, dims = self.shapes.get(self.args_tensor(node)), arg(node, 1, "dim", None)
        if x is None or source is None:
            return self.opaque(node)
        if dims is None:
            # Keeping one channel would make squeeze() drop the channel dimension too.
            return self.opaque(node, f"{self.where(node)} without a dim (name the dimensions to squeeze)")
        dims = {d % len(source) for d in (dims if isinstance(dims, (tuple, list)) else [dims])}
        if x.dim in dims:
            return self.opaque(node, f"{self.where(node)}, which squeezes their channel dimension")
        return _Chan(x.dim - sum(d < x.dim and source[d] == 1 for d in dims), x.segs)

    def index(self, node: fx.Node, x: _Chan | None) -> _Chan | None:
        """``x[:, :, None, None]`` only inserts size-1 dimensions; any other index is opaque."""
        idx = node.args[1] if len(node.args) > 1 else None
        items = idx if isinstance(idx, tuple) else (idx,)
        source, out = self.shapes.get(self.args_tensor(node)), self.shapes.get(node)
        plain = all(i is None or i is Ellipsis or i == slice(None) for i in items)
        dim = _singleton_map(source, out, x.dim) if plain and x is not None and source and out else None
        return self.opaque(node) if dim is None else _Chan(dim, x.segs)

    def reduce(self, node: fx.Node, x: _Chan | None) -> _Chan | None:
        shape = self.shapes.get(self.args_tensor(node))
        dims = arg(node, 1, "dim", None)
        keepdim = arg(node, 2, "keepdim", False)
        if x is None or shape is None or dims is None or node not in self.shapes:
            return self.opaque(node)
        dims = {d % len(shape) for d in (dims if isinstance(dims, (tuple, list)) else [dims])}
        if x.dim in dims:
            return self.opaque(node, f"{self.where(node)}, which reduces over their channels")
        return _Chan(x.dim if keepdim else x.dim - sum(d < x.dim for d in dims), x.segs)

    def cat(self, node: fx.Node) -> _Chan | None:
        tensors = arg(node, 0, "tensors", None)
        out = self.shapes.get(node)
        if not isinstance(tensors, (list, tuple)) or out is None or not all(isinstance(t, fx.Node) and t in self.shapes for t in tensors):
            return self.opaque(node)
        dim = arg(node, 1, "dim", 0) % len(out)
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

    def size_source(self, value: Any) -> tuple[fx.Node, int] | None:
        """``(tensor, axis)`` when ``value`` is ``tensor.size(axis)``, ``.size()[axis]`` or ``.shape[axis]``."""
        if not isinstance(value, fx.Node) or len(value.args) != 2 or not isinstance(value.args[1], int):
            return None
        if value.op == "call_method" and value.target == "size":
            tensor = value.args[0]
        elif value.op == "call_function" and value.target is operator.getitem and isinstance(value.args[0], fx.Node):
            sizes = value.args[0]
            whole = sizes.op == "call_method" and sizes.target == "size" and len(sizes.args) == 1
            shape = sizes.op == "call_function" and sizes.target is getattr and sizes.args[1:] == ("shape",)
            if not (whole or shape):
                return None
            tensor = sizes.args[0]
        else:
            return None
        rank = len(self.shapes.get(tensor, ())) if isinstance(tensor, fx.Node) else 0
        return (tensor, value.args[1] % rank) if rank else None

    def args_tensor(self, node: fx.Node) -> fx.Node | None:
        first = node.args[0] if node.args else None
        return first if isinstance(first, fx.Node) else None


def _split(chan: _Chan) -> str:
    return "+".join(str(s.size) if s.block == 1 else f"{s.size}x{s.block}" for s in chan.segs)


def _singleton_map(source: tuple[int, ...], out: tuple[int, ...], dim: int) -> int | None:
    """Where axis ``dim`` of ``source`` ends up when reshaping to ``out`` only adds or removes
    size-1 axes; ``None`` when the reshape does more, or the axis itself has size 1."""
    if source[dim] == 1:
        return None
    kept_in = [i for i, n in enumerate(source) if n != 1]
    kept_out = [i for i, n in enumerate(out) if n != 1]
    if [source[i] for i in kept_in] != [out[i] for i in kept_out]:
        return None
    return kept_out[kept_in.index(dim)]
