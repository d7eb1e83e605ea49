"""The result of a memory profile: a timeline of live bytes by category, the peak, and what
was live there.

The tracker (:mod:`slimkit.memory.storage_tracker`) records, for every tensor storage, the
operator event that created it and the first event at which it was gone. This module turns
those lifetimes into the timeline, the peak, the largest live tensors and the per-module
table, after the step has run, so that a storage's category can be decided with hindsight:
a tensor made in backward that ends up as a parameter's ``.grad`` is a gradient from the
moment it was made.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

PROFILE_SCHEMA_VERSION = 1

# Bottom to top in the timeline plot: what exists before the step first, then what the
# step adds.
CATEGORIES = (
    "parameters",
    "buffers",
    "inputs",
    "other",
    "optimizer_state",
    "gradients",
    "activations",
    "temporaries",
)
CATEGORY_HELP = {
    "parameters": "the model's parameters",
    "buffers": "the model's buffers (batch-norm statistics, position ids, ...)",
    "inputs": "the tensors passed to the model",
    "other": "tensors that existed before the step and that it read, neither parameters, "
             "buffers nor inputs (tensors kept in plain module attributes, constants)",
    "optimizer_state": "optimizer state after the step (Adam's two moments and step counts)",
    "gradients": "tensors that end up as a parameter's .grad, from the moment they are made",
    "activations": "everything made in the forward pass and the loss (the output, the "
                   "activations saved for backward, short-lived intermediates)",
    "temporaries": "everything else made in backward and in the optimizer step",
}
PHASES = ("start", "forward", "loss", "backward", "optimizer", "end")


@dataclass
class StorageRecord:
    """One tensor storage the tracker saw, with its lifetime in event indices.

    ``created`` is the event at which it first counts; ``freed`` the first event at which it
    no longer does (None: still alive when tracking stopped). ``kind`` is the category fixed
    when it was registered or discovered (parameters, gradients, ...); None means it is
    decided by the phase that made it.
    """

    nbytes: int
    created: int
    phase: str
    op: str
    module: str | None
    shape: tuple[int, ...]
    dtype: str
    name: str | None = None
    kind: str | None = None
    freed: int | None = None
    ref: Any = field(default=None, repr=False)

    @property
    def category(self) -> str:
        if self.kind is not None:
            return self.kind
        return "activations" if self.phase in ("forward", "loss") else "temporaries"


@dataclass(frozen=True)
class Event:
    """The live bytes right after one operator ran (or at the start or end of the step).

    Attributes:
        index: position in the timeline.
        op: the ATen operator (``aten.addmm``), or ``<start>`` / ``<end>``.
        module: qualified name of the innermost module running it (``""`` is the model
            itself); None outside the model (the loss, the optimizer).
        phase: ``start``, ``forward``, ``loss``, ``backward``, ``optimizer`` or ``end``.
        bytes: live bytes by category.
    """

    index: int
    op: str
    module: str | None
    phase: str
    bytes: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.bytes.values())


@dataclass(frozen=True)
class LiveTensor:
    """A tensor storage live at the peak: what made it and how big it is.

    ``shape`` and ``dtype`` are those of the first tensor seen on the storage; ``bytes`` is
    the storage's size, which views of it share.
    """

    bytes: int
    shape: tuple[int, ...]
    dtype: str
    category: str
    op: str
    module: str | None
    phase: str
    name: str | None = None
    created: int = 0


@dataclass(frozen=True)
class ModuleMemory:
    """Activation memory made by one module's own operators (not its submodules').

    Attributes:
        module: qualified name (``""`` is the model itself).
        tensors: activation storages its forward made.
        allocated_bytes: their total size.
        peak_live_bytes: the most of them alive at one time.
        live_at_peak_bytes: how much of them was alive at the step's peak.
        backward_bytes: temporaries its backward made (in a training step).
    """

    module: str
    tensors: int
    allocated_bytes: int
    peak_live_bytes: int
    live_at_peak_bytes: int
    backward_bytes: int = 0


@dataclass(frozen=True)
class Peak:
    """The moment of the most live bytes, and what was live then."""

    bytes: int
    index: int
    op: str
    module: str | None
    phase: str
    by_category: dict[str, int]
    tensors: list[LiveTensor]


@dataclass
class MemoryProfile:
    """The live-tensor memory of one forward pass or one training step.

    Attributes:
        device: where the model ran.
        train: True for a training step, False for a forward pass.
        timeline: one event per operator, plus ``<start>`` and ``<end>``.
        peak: the peak of tracked live bytes.
        modules: activation memory per module, in the order the modules first ran.
        allocator: on CUDA, the caching allocator's own statistics for the step
            (``peak_allocated_bytes`` and more); None elsewhere.
    """

    device: str
    train: bool
    timeline: list[Event]
    peak: Peak
    modules: list[ModuleMemory]
    allocator: dict[str, Any] | None = None

    @property
    def start(self) -> dict[str, int]:
        """Live bytes by category before the first operator."""
        return self.timeline[0].bytes

    @property
    def end(self) -> dict[str, int]:
        """Live bytes by category once the step is over and its outputs are dropped."""
        return self.timeline[-1].bytes

    def phases(self) -> list[dict[str, Any]]:
        """Each contiguous run of one phase, with its own peak.

        Returns:
            ``{phase, start, stop, peak_bytes, peak_index}`` per run; ``stop`` is exclusive.
        """
        runs: list[dict[str, Any]] = []
        for e in self.timeline:
            total = e.total
            if runs and runs[-1]["phase"] == e.phase:
                run = runs[-1]
                run["stop"] = e.index + 1
                if total > run["peak_bytes"]:
                    run["peak_bytes"], run["peak_index"] = total, e.index
            else:
                runs.append({"phase": e.phase, "start": e.index, "stop": e.index + 1,
                             "peak_bytes": total, "peak_index": e.index})
        return runs

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; the timeline is stored column by column to stay compact."""
        return {
            "schema_version": PROFILE_SCHEMA_VERSION,
            "device": self.device,
            "train": self.train,
            "categories": list(CATEGORIES),
            "peak": {
                "bytes": self.peak.bytes, "index": self.peak.index, "op": self.peak.op,
                "module": self.peak.module, "phase": self.peak.phase,
                "by_category": dict(self.peak.by_category),
            },
            "start": dict(self.start),
            "end": dict(self.end),
            "largest": [{**asdict(t), "shape": list(t.shape)} for t in self.peak.tensors],
            "modules": [asdict(m) for m in self.modules],
            "phases": self.phases(),
            "timeline": {
                "op": [e.op for e in self.timeline],
                "module": [e.module for e in self.timeline],
                "phase": [e.phase for e in self.timeline],
                "bytes": {c: [e.bytes[c] for e in self.timeline] for c in CATEGORIES},
            },
            "allocator": self.allocator,
        }


def build_profile(records: Sequence[StorageRecord], events: Sequence[tuple[str, str | None, str]], *,
                  device: str, train: bool, top_k: int = 10,
                  allocator: dict[str, Any] | None = None) -> MemoryProfile:
    """Turn storage lifetimes and the operator events into a :class:`MemoryProfile`.

    Args:
        records: every storage seen, with ``created`` / ``freed`` event indices.
        events: ``(op, module, phase)`` of each event, in order.
        device: where the model ran, for the record.
        train: whether this was a training step.
        top_k: how many of the largest live tensors at the peak to keep.
        allocator: the CUDA allocator's statistics, if any.
    """
    n = len(events)
    assert n > 0, "a profile has at least its <start> and <end> events"
    live = _live_by_category(records, n)
    total = live.sum(axis=0)
    p = int(np.argmax(total))  # the first moment of the maximum
    timeline = [
        Event(i, op, module, phase, {c: int(live[k, i]) for k, c in enumerate(CATEGORIES)})
        for i, (op, module, phase) in enumerate(events)
    ]
    at_peak = [r for r in records if _alive(r, p)]
    at_peak.sort(key=lambda r: (-r.nbytes, r.created))
    tensors = [LiveTensor(r.nbytes, tuple(r.shape), r.dtype, r.category, r.op, r.module, r.phase,
                          r.name, r.created) for r in at_peak[:top_k]]
    op, module, phase = events[p]
    peak = Peak(int(total[p]), p, op, module, phase, dict(timeline[p].bytes), tensors)
    return MemoryProfile(device, train, timeline, peak, _modules(records, p), allocator)


def _alive(r: StorageRecord, i: int) -> bool:
    return r.created <= i and (r.freed is None or r.freed > i)


def _live_by_category(records: Sequence[StorageRecord], n: int) -> np.ndarray:
    """``[category, event]`` live bytes, from each storage's lifetime."""
    index = {c: k for k, c in enumerate(CATEGORIES)}
    delta = np.zeros((len(CATEGORIES), n + 1), dtype=np.int64)
    for r in records:
        k = index[r.category]
        delta[k, r.created] += r.nbytes
        if r.freed is not None:
            delta[k, min(r.freed, n)] -= r.nbytes
    return np.cumsum(delta, axis=1)[:, :n]


def _modules(records: Sequence[StorageRecord], peak: int) -> list[ModuleMemory]:
    acts: dict[str, list[StorageRecord]] = {}
    backward: dict[str, int] = {}
    first: dict[str, int] = {}
    for r in records:
        if r.module is None or r.kind is not None:
            continue
        first.setdefault(r.module, r.created)
        if r.category == "activations":
            acts.setdefault(r.module, []).append(r)
        elif r.phase == "backward":
            backward[r.module] = backward.get(r.module, 0) + r.nbytes
    rows = []
    for name in sorted(first, key=lambda m: first[m]):
        mine = acts.get(name, [])
        rows.append(ModuleMemory(
            module=name,
            tensors=len(mine),
            allocated_bytes=sum(r.nbytes for r in mine),
            peak_live_bytes=_max_live(mine),
            live_at_peak_bytes=sum(r.nbytes for r in mine if _alive(r, peak)),
            backward_bytes=backward.get(name, 0),
        ))
    return rows


def _max_live(records: list[StorageRecord]) -> int:
    """The most bytes of ``records`` alive at any one event."""
    delta: dict[int, int] = {}
    for r in records:
        delta[r.created] = delta.get(r.created, 0) + r.nbytes
        if r.freed is not None:
            delta[r.freed] = delta.get(r.freed, 0) - r.nbytes
    best = running = 0
    for i in sorted(delta):
        running += delta[i]
        best = max(best, running)
    return best


def format_bytes(n: float | None) -> str:
    """``1536`` -> ``1.5 kB``: decimal units, as the run report's MB (10⁶ bytes)."""
    if n is None:
        return "—"
    n = float(n)
    if abs(n) < 1000:
        return f"{n:,.0f} B"
    for unit in ("kB", "MB", "GB"):
        n /= 1000
        if abs(round(n, 1)) < 1000 or unit == "GB":
            break
    return f"{n:,.1f} {unit}"


def module_label(module: str | None) -> str:
    """How a module path is shown: ``(model)`` for the model itself, ``—`` outside it."""
    if module is None:
        return "—"
    return module or "(model)"
