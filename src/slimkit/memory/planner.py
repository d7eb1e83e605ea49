"""Static memory planning: give every tensor an offset in one arena so that tensors alive
at the same time never overlap.

The input is a list of :class:`TensorLife` — a size in bytes and the first and last step
(inclusive) at which the tensor must hold its value. The output is a :class:`MemoryPlan`:
one offset per tensor, the arena size, and the two numbers that judge it:

- the **lower bound**, the largest total of bytes alive at any one step (no plan can use
  less, since those tensors must all exist at once), and
- the **no-reuse total**, the sum of all sizes (what giving each tensor its own memory
  costs).

Finding the smallest arena is NP-hard (it is dynamic storage allocation), so planning
uses greedy strategies from Pisarchyk & Lee, "Efficient Memory Management for Deep Neural
Net Inference" (2020), the planners behind TensorFlow Lite's GPU delegate, and keeps the
best per graph. Every strategy places one tensor at a time in the smallest gap, among the
tensors already placed whose lifetimes overlap its own, that fits it (best fit); they
differ in the order in which tensors are placed:

- ``greedy_by_size``: largest first (ties: earliest first use). Big tensors get the low
  offsets; small ones fill the gaps between them.
- ``greedy_by_breadth``: the step with the most bytes alive first, and within a step its
  tensors largest first. The peak steps, which decide the arena size, are packed before
  anything else constrains them.
- ``greedy_by_lifetime``: longest-lived first (ties: largest). Long-lived tensors split
  the arena into fragments for everything else if they are placed late.

This module is pure Python: it knows nothing about torch and is tested on random
lifetimes (``tests/memory/test_planner.py``).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from slimkit.errors import SlimkitError

DEFAULT_ALIGNMENT = 64  # a cache line, and the alignment of PyTorch's CPU allocator


class PlanError(SlimkitError):
    """A plan places two tensors that are alive at the same step in overlapping bytes."""


@dataclass(frozen=True)
class TensorLife:
    """A tensor to place: ``size`` bytes alive from step ``first`` to step ``last`` inclusive."""

    size: int
    first: int
    last: int
    name: str = ""

    def __post_init__(self):
        if self.size < 0 or self.first < 0 or self.last < self.first:
            raise ValueError(
                f"tensor {self.name or '?'}: size={self.size}, first={self.first}, last={self.last}; "
                "give size >= 0 and 0 <= first <= last"
            )


@dataclass(frozen=True)
class MemoryPlan:
    """Where each tensor lives in the arena, and how good that is.

    Attributes:
        offsets: byte offset of each tensor, in the order the tensors were given.
        arena_bytes: size of the arena the offsets need (a multiple of ``alignment``).
        lower_bound: the largest total of (aligned) bytes alive at any one step.
        no_reuse_bytes: the total of all (aligned) sizes: every tensor in its own memory.
        strategy: the strategy whose offsets these are.
        alignment: every offset is a multiple of it.
        tried: arena size found by every strategy that was run.
    """

    offsets: tuple[int, ...]
    arena_bytes: int
    lower_bound: int
    no_reuse_bytes: int
    strategy: str
    alignment: int
    tried: dict[str, int] = field(default_factory=dict)

    @property
    def ratio_to_lower_bound(self) -> float:
        """``arena_bytes / lower_bound`` (1.0 is optimal; 1.0 for an empty plan)."""
        return self.arena_bytes / self.lower_bound if self.lower_bound else 1.0

    def to_dict(self) -> dict:
        return {
            "strategy": self.strategy, "alignment": self.alignment, "arena_bytes": self.arena_bytes,
            "lower_bound_bytes": self.lower_bound, "no_reuse_bytes": self.no_reuse_bytes,
            "ratio_to_lower_bound": round(self.ratio_to_lower_bound, 4), "tried": dict(self.tried),
        }


def aligned(size: int, alignment: int) -> int:
    """``size`` rounded up to a multiple of ``alignment``."""
    return -(-size // alignment) * alignment


def _check_alignment(alignment: int) -> None:
    if alignment < 1 or alignment & (alignment - 1):
        raise ValueError(f"alignment={alignment}: give a power of two, such as 64")


def breadths(tensors: Sequence[TensorLife], alignment: int = DEFAULT_ALIGNMENT) -> list[int]:
    """Bytes alive at each step ``0 .. max(last)`` (sizes rounded up to ``alignment``)."""
    _check_alignment(alignment)
    if not tensors:
        return []
    delta = [0] * (max(t.last for t in tensors) + 2)
    for t in tensors:
        s = aligned(t.size, alignment)
        delta[t.first] += s
        delta[t.last + 1] -= s
    out, alive = [], 0
    for d in delta[:-1]:
        alive += d
        out.append(alive)
    return out


def lower_bound(tensors: Sequence[TensorLife], alignment: int = DEFAULT_ALIGNMENT) -> int:
    """The largest total of bytes alive at any one step: no arena can be smaller.

    Sizes are rounded up to ``alignment``, as an arena with aligned offsets must hold them.
    """
    return max(breadths(tensors, alignment), default=0)


def no_reuse_bytes(tensors: Sequence[TensorLife], alignment: int = DEFAULT_ALIGNMENT) -> int:
    """Bytes needed when no two tensors share memory (sizes rounded up to ``alignment``)."""
    _check_alignment(alignment)
    return sum(aligned(t.size, alignment) for t in tensors)


def _best_fit(order: Sequence[int], sizes: list[int], tensors: Sequence[TensorLife]) -> list[int]:
    """Place tensors in ``order``, each in the smallest gap that fits among the placed
    tensors whose lifetimes overlap its own, or above all of them."""
    offsets = [-1] * len(tensors)
    placed: list[tuple[int, int]] = []  # (offset, index), sorted by offset
    for i in order:
        t, size = tensors[i], sizes[i]
        if size == 0:
            offsets[i] = 0
            continue
        best, best_gap, top = -1, None, 0
        for off, j in placed:
            u = tensors[j]
            if u.last < t.first or t.last < u.first:
                continue
            gap = off - top
            if gap >= size and (best_gap is None or gap < best_gap):
                best, best_gap = top, gap
            top = max(top, off + sizes[j])
        offsets[i] = top if best < 0 else best
        bisect.insort(placed, (offsets[i], i))
    return offsets


def _by_size(tensors: Sequence[TensorLife], sizes: list[int], alignment: int) -> list[int]:
    order = sorted(range(len(tensors)), key=lambda i: (-sizes[i], tensors[i].first, i))
    return _best_fit(order, sizes, tensors)


def _by_breadth(tensors: Sequence[TensorLife], sizes: list[int], alignment: int) -> list[int]:
    width = breadths(tensors, alignment)
    alive_at: list[list[int]] = [[] for _ in width]
    for i, t in enumerate(tensors):
        for step in range(t.first, t.last + 1):
            alive_at[step].append(i)
    order, seen = [], set()
    for step in sorted(range(len(width)), key=lambda s: (-width[s], s)):
        for i in sorted(alive_at[step], key=lambda i: (-sizes[i], tensors[i].first, i)):
            if i not in seen:
                seen.add(i)
                order.append(i)
    return _best_fit(order, sizes, tensors)


def _by_lifetime(tensors: Sequence[TensorLife], sizes: list[int], alignment: int) -> list[int]:
    order = sorted(range(len(tensors)), key=lambda i: (tensors[i].first - tensors[i].last, -sizes[i], i))
    return _best_fit(order, sizes, tensors)


Strategy = Callable[[Sequence[TensorLife], list[int], int], list[int]]

STRATEGIES: dict[str, Strategy] = {
    "greedy_by_size": _by_size,
    "greedy_by_breadth": _by_breadth,
    "greedy_by_lifetime": _by_lifetime,
}


def plan_memory(
    tensors: Sequence[TensorLife], alignment: int = DEFAULT_ALIGNMENT, strategy: str = "auto"
) -> MemoryPlan:
    """Assign every tensor an offset in one arena; alive-together tensors never overlap.

    Args:
        tensors: sizes and inclusive lifetimes (steps are any non-negative integers).
        alignment: every offset is a multiple of it (a power of two).
        strategy: a name in :data:`STRATEGIES`, or ``auto`` to run them all and keep the
            smallest arena (the first listed wins a tie).

    Returns:
        The plan, already checked with :func:`validate_plan`.
    """
    _check_alignment(alignment)
    if strategy != "auto" and strategy not in STRATEGIES:
        raise ValueError(f"unknown planning strategy {strategy!r}; use 'auto' or one of {sorted(STRATEGIES)}")
    sizes = [aligned(t.size, alignment) for t in tensors]
    names = list(STRATEGIES) if strategy == "auto" else [strategy]
    tried: dict[str, int] = {}
    best: tuple[int, str, list[int]] | None = None
    for name in names:
        offsets = STRATEGIES[name](tensors, sizes, alignment)
        size = max((o + s for o, s in zip(offsets, sizes, strict=True)), default=0)
        tried[name] = size
        if best is None or size < best[0]:
            best = (size, name, offsets)
    assert best is not None
    plan = MemoryPlan(
        offsets=tuple(best[2]), arena_bytes=best[0], lower_bound=lower_bound(tensors, alignment),
        no_reuse_bytes=sum(sizes), strategy=best[1], alignment=alignment, tried=tried,
    )
    validate_plan(tensors, plan)
    return plan


def validate_plan(tensors: Sequence[TensorLife], plan: MemoryPlan) -> None:
    """Check that no two tensors alive at the same step share a byte, that every offset is
    aligned and that every tensor fits in the arena.

    Raises:
        PlanError: listing every problem found (the first 20).
    """
    problems = []
    if len(plan.offsets) != len(tensors):
        raise PlanError(f"the plan has {len(plan.offsets)} offsets for {len(tensors)} tensors")
    spans = []
    for i, (t, off) in enumerate(zip(tensors, plan.offsets, strict=True)):
        label = t.name or f"#{i}"
        if off < 0 or off % plan.alignment:
            problems.append(f"{label}: offset {off} is not a non-negative multiple of {plan.alignment}")
        if off + t.size > plan.arena_bytes:
            problems.append(f"{label}: bytes [{off}, {off + t.size}) exceed the arena of {plan.arena_bytes}")
        if t.size:
            spans.append((off, off + t.size, i))
    # Sweep by offset: only tensors whose byte ranges overlap need their lifetimes compared.
    spans.sort()
    open_spans: list[tuple[int, int, int]] = []
    for start, end, i in spans:
        open_spans = [s for s in open_spans if s[1] > start]
        t = tensors[i]
        for _, _, j in open_spans:
            u = tensors[j]
            if not (u.last < t.first or t.last < u.first):
                problems.append(
                    f"{u.name or f'#{j}'} (steps {u.first}-{u.last}, bytes {plan.offsets[j]}+{u.size}) overlaps "
                    f"{t.name or f'#{i}'} (steps {t.first}-{t.last}, bytes {start}+{t.size})"
                )
        open_spans.append((start, end, i))
    if not problems and plan.arena_bytes < lower_bound(tensors, 1):  # implied by the rest; a last guard
        problems.append(f"arena {plan.arena_bytes} is below the lower bound {lower_bound(tensors, 1)}")
    if problems:
        more = f" (and {len(problems) - 20} more)" if len(problems) > 20 else ""
        raise PlanError("invalid memory plan:\n" + "\n".join(f"  - {p}" for p in problems[:20]) + more)
