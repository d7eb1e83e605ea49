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

The package is split by concern, each module depending only on those above it:

- :mod:`~slimkit.memory.arena.errors`: :class:`TraceError` and :class:`ArenaFallbackWarning`;
- :mod:`~slimkit.memory.arena.config`: :class:`ArenaConfig`;
- :mod:`~slimkit.memory.arena.trace`: tracing with ``torch.export`` (step 1);
- :mod:`~slimkit.memory.arena.lowerings`: the kernels operators are bound to (step 5);
- :mod:`~slimkit.memory.arena.lifetimes`: one bucket's graph measured, its storages,
  lifetimes and in-place reuse (steps 2 to 4);
- :mod:`~slimkit.memory.arena.buckets`: a bucket's plan and program, padding requests up
  to a bucket and choosing it;
- :mod:`~slimkit.memory.arena.binding`: binding a planned bucket to arena views (step 5);
- :mod:`~slimkit.memory.arena.executor`: :class:`ArenaExecutor` and :func:`build_arena`;
- :mod:`~slimkit.memory.arena.allocations`: :func:`count_allocations`.
"""

from slimkit.memory.arena.allocations import count_allocations
from slimkit.memory.arena.config import ArenaConfig
from slimkit.memory.arena.errors import ArenaFallbackWarning, TraceError
from slimkit.memory.arena.executor import ArenaExecutor, build_arena
from slimkit.memory.arena.lowerings import Binder, Kernel, Lowering

# A private name of the single module this package was, kept for code that still uses it:
# the tests replace a lowering in this very dict.
from slimkit.memory.arena.lowerings import _LOWERINGS as _LOWERINGS  # isort: skip

__all__ = [
    "ArenaConfig",
    "ArenaExecutor",
    "ArenaFallbackWarning",
    "Binder",
    "Kernel",
    "Lowering",
    "TraceError",
    "build_arena",
    "count_allocations",
]
