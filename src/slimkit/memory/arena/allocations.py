"""Counting what an executor still allocates per request in steady state, with
``torch.profiler``: activations, workspaces, and the rest."""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import torch

from slimkit.memory.arena.executor import ArenaExecutor


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
