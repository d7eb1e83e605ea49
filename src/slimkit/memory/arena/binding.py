"""Binding a planned bucket: every output becomes a view of the arena at its planned
offset, every operator a kernel writing into those views (``out=`` overload, lowering,
or the ordinary operator plus a copy), each kernel checked against its node's eager result."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from slimkit.memory.arena.buckets import _Bucket
from slimkit.memory.arena.errors import TraceError
from slimkit.memory.arena.lifetimes import (
    _Analysis,
    _by_name,
    _Compute,
    _layout,
    _storage_key,
    _tensors,
)
from slimkit.memory.arena.lowerings import Kernel, _scalar


class _KernelBinding:
    """The executor's binding of a bucket to the arena. Mixed into
    :class:`~slimkit.memory.arena.executor.ArenaExecutor`, whose ``config``, ``_arena``,
    ``_base`` and ``_seq_inputs()`` it uses."""

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

