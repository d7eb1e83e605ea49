"""Analysis of one bucket's graph before the arena exists: which nodes run per request
(and which are constants or views), which storage each output lives in and for how long
(the lifetimes :mod:`slimkit.memory.planner` places), which kernel each operator gets,
and which outputs write over an input that dies there."""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from slimkit.memory.arena.errors import TraceError
from slimkit.memory.arena.lowerings import (
    _COPIES,
    _INPLACE_ARGS,
    _LOWERINGS,
    _POINTWISE,
    _out_overload,
)
from slimkit.memory.planner import TensorLife

if TYPE_CHECKING:
    from slimkit.memory.arena.config import ArenaConfig

aten = torch.ops.aten


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
