"""Peak activation memory of a training step, measured the same way on CPU and GPU.

A CPU has no allocator statistics, so :class:`LiveStorageCounter` counts bytes itself: every
tensor storage an operator creates while it is active is added when it appears and
subtracted when Python's garbage collector sees it die. Storages that existed before
(parameters, inputs, pre-allocated gradients) are never counted, and views and in-place
results share their input's storage, so nothing is counted twice. On CUDA the caching
allocator's own peak is used instead, which also sees kernel workspaces and rounding.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


@dataclass
class Phase:
    """A stretch of a step between two marks, with the live bytes at its start and peak."""

    label: Any
    start_bytes: int
    peak_bytes: int


class LiveStorageCounter(TorchDispatchMode):
    """Live bytes of the tensor storages created while this mode is active, and their peak.

    Use it as a context manager around code that runs operators (a forward and backward):
    ``with LiveStorageCounter() as t: step()``, then read ``t.peak_bytes``. ``mark(label)``
    starts a new :class:`Phase`, so a caller can learn where in the step the peak falls.

    What it does not see: memory a kernel allocates and frees internally (scratch space),
    and allocator overheads (rounding, fragmentation). Storages are matched to their
    Python objects, which torch keeps alive exactly as long as the storage itself.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self.phases: list[Phase] = []
        self._sizes: dict[int, int] = {}  # id of a live storage object -> its bytes
        self._born: dict[int, int] = {}  # id -> creation order, to tell what a span made
        self._counter = 0
        self._finalizers: list[weakref.finalize] = []
        # A finalizer may run inside the garbage collector while _track holds the lock
        # in the same thread, so the lock must be re-entrant.
        self._lock = threading.RLock()
        self._active = False

    def __enter__(self) -> LiveStorageCounter:
        self._active = True
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        try:
            super().__exit__(*exc)
        finally:
            self._active = False
            for f in self._finalizers:
                f.detach()
            self._finalizers.clear()

    # -- reading --------------------------------------------------------------------

    @property
    def counter(self) -> int:
        """How many storages have been created so far: a position in the step."""
        return self._counter

    def bytes_born_since(self, counter: int) -> int:
        """Bytes of the storages created after position ``counter`` that are still live."""
        with self._lock:
            return sum(self._sizes[k] for k, born in self._born.items() if born >= counter)

    def is_tracked(self, storage: torch.UntypedStorage) -> bool:
        return id(storage) in self._sizes

    def born_after(self, storage: torch.UntypedStorage, counter: int) -> bool:
        """Whether ``storage`` is live and was created after position ``counter``."""
        return self._born.get(id(storage), -1) >= counter

    def mark(self, label: Any) -> Phase:
        """Start a new phase; the phase before it ends here."""
        phase = Phase(label, self.live_bytes, self.live_bytes)
        self.phases.append(phase)
        return phase

    # -- counting -------------------------------------------------------------------

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if outputs:
            inputs = None
            for t in outputs:
                st = _storage(t)
                if st is None:
                    continue
                key = id(st)
                if key in self._sizes:
                    self._resized(key, st)
                    continue
                if inputs is None:
                    inputs = {id(s) for s in map(_storage, _tensors(args, kwargs)) if s is not None}
                if key in inputs:
                    # A view or in-place result of something that existed before tracking.
                    continue
                self._track(key, st)
        return out

    def _track(self, key: int, st: torch.UntypedStorage) -> None:
        nbytes = st.nbytes()
        with self._lock:
            self._sizes[key] = nbytes
            self._born[key] = self._counter
            self._counter += 1
            self.live_bytes += nbytes
            self._note_peak()
        self._finalizers.append(weakref.finalize(st, self._free, key))

    def _resized(self, key: int, st: torch.UntypedStorage) -> None:
        nbytes = st.nbytes()
        with self._lock:
            old = self._sizes.get(key)
            if old is not None and old != nbytes:
                self._sizes[key] = nbytes
                self.live_bytes += nbytes - old
                self._note_peak()

    def _note_peak(self) -> None:
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        if self.phases:
            p = self.phases[-1]
            p.peak_bytes = max(p.peak_bytes, self.live_bytes)

    def _free(self, key: int) -> None:
        with self._lock:
            self.live_bytes -= self._sizes.pop(key, 0)
            self._born.pop(key, None)


def _tensors(args: Any, kwargs: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]


def _storage(t: torch.Tensor) -> torch.UntypedStorage | None:
    if t.is_meta or t.layout != torch.strided:
        return None
    try:
        st = t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # tensor subclasses without a storage
        return None
    return st if st.nbytes() > 0 else None


@dataclass(frozen=True)
class PeakMeasurement:
    """Peak bytes a step allocated beyond what existed before it.

    Attributes:
        peak_bytes: the activation peak (saved tensors, temporaries, gradients of
            activations); parameters, their gradients and the inputs are not in it.
        method: ``storages`` (:class:`LiveStorageCounter`) or ``cuda_allocator``
            (``torch.cuda.max_memory_allocated`` minus the bytes allocated before).
        device: the device the step ran on.
    """

    peak_bytes: int
    method: str
    device: str


@contextmanager
def preallocated_grads(params: Iterable[torch.nn.Parameter]) -> Iterator[None]:
    """Give every parameter that needs one a zero ``.grad`` for the duration, then restore.

    With gradients already allocated, backward adds into them in place, so a step's peak
    is its activations alone, whether or not the step is the first of a training run.
    """
    params = [p for p in params if p.requires_grad]
    saved = [p.grad for p in params]
    try:
        for p in params:
            p.grad = torch.zeros_like(p)
        yield
    finally:
        for p, g in zip(params, saved, strict=True):
            p.grad = g


def measure_activation_peak(
    step: Callable[[], object],
    params: Iterable[torch.nn.Parameter] = (),
    device: torch.device | str = "cpu",
    method: Literal["auto", "storages", "cuda_allocator"] = "auto",
) -> PeakMeasurement:
    """Run ``step`` (a forward and backward) once and return its activation peak.

    Args:
        step: runs one training step's forward and backward.
        params: the model's parameters: they get zero gradients for the step (restored
            afterwards, so the step's gradients are discarded) so that gradient memory,
            which every variant of a model needs alike, is not counted as activations.
        device: where the step runs.
        method: ``auto`` uses the CUDA allocator on a CUDA device and storage tracking
            elsewhere.
    """
    device = torch.device(device)
    if method == "auto":
        method = "cuda_allocator" if device.type == "cuda" else "storages"
    with preallocated_grads(params):
        if method == "cuda_allocator":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            step()
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device) - base
        else:
            with LiveStorageCounter() as tracker:
                step()
            peak = tracker.peak_bytes
    return PeakMeasurement(int(peak), method, str(device))
