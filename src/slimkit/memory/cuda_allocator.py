"""The CUDA caching allocator's own account of a step: peak statistics and, on request, a
snapshot with the stack trace of every allocation.

Tensor tracking (:mod:`slimkit.memory.storage_tracker`) works on CUDA too and gives the
categories and the modules; the allocator adds what only it knows: block rounding,
workspaces of cuBLAS and cuDNN, and the memory it reserves from the driver.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from slimkit.atomic import write_with

MAX_HISTORY_ENTRIES = 100_000


class AllocatorWatch:
    """Context manager: the allocator's peak statistics over the block, on CUDA only.

    Elsewhere it does nothing and :attr:`stats` stays None.

    Args:
        device: the device the step runs on.
        snapshot: where to write the allocator's snapshot (a pickle that PyTorch's memory
            viewer, ``torch.cuda._memory_viz``, reads); None for no snapshot.
    """

    def __init__(self, device: torch.device, snapshot: str | os.PathLike | None = None):
        self.device = device
        self.snapshot = Path(snapshot) if snapshot is not None else None
        self.stats: dict[str, Any] | None = None
        self._before = 0
        self._history = False

    @property
    def active(self) -> bool:
        return self.device.type == "cuda" and torch.cuda.is_available()

    def __enter__(self) -> AllocatorWatch:
        if not self.active:
            return self
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self._before = torch.cuda.memory_allocated(self.device)
        record = getattr(torch.cuda.memory, "_record_memory_history", None)
        if self.snapshot is not None and record is not None:
            record(max_entries=MAX_HISTORY_ENTRIES)
            self._history = True
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.active:
            return
        try:
            torch.cuda.synchronize(self.device)
            stats = torch.cuda.memory_stats(self.device)
            peak = int(stats.get("allocated_bytes.all.peak", 0))
            self.stats = {
                "source": "torch.cuda.memory_stats",
                "allocated_before_bytes": int(self._before),
                "peak_allocated_bytes": peak,
                "peak_above_start_bytes": peak - int(self._before),
                "peak_reserved_bytes": int(stats.get("reserved_bytes.all.peak", 0)),
                "alloc_retries": int(stats.get("num_alloc_retries", 0)),
                "ooms": int(stats.get("num_ooms", 0)),
                "snapshot": None,
            }
            if self._history and exc[0] is None:
                dump = torch.cuda.memory._dump_snapshot
                write_with(self.snapshot, lambda tmp: dump(str(tmp)))
                self.stats["snapshot"] = str(self.snapshot)
        finally:
            if self._history:
                torch.cuda.memory._record_memory_history(enabled=None)
