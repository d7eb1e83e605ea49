"""Memory: where it goes (profiler), how to plan it (activation arena), how to trade
compute for it (checkpointing to a budget) and how to share it (memory-mapped weights,
a content-addressed weight store).

The names below are imported on first use, so ``import slimkit.memory`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "profile": "slimkit.memory.profiler",
    "MemoryProfile": "slimkit.memory.timeline",
    "print_profile": "slimkit.memory.profile_table",
    "plan_memory": "slimkit.memory.planner",
    "ArenaConfig": "slimkit.memory.arena",
    "ArenaExecutor": "slimkit.memory.arena",
    "build_arena": "slimkit.memory.arena",
    "count_allocations": "slimkit.memory.arena",
    "CheckpointConfig": "slimkit.memory.checkpoint",
    "checkpoint_": "slimkit.memory.checkpoint",
    "profile_checkpointing": "slimkit.memory.checkpoint",
    "plan_checkpointing": "slimkit.memory.checkpoint",
    "load_shared": "slimkit.memory.shared_weights",
    "WeightStore": "slimkit.memory.store",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'slimkit.memory' has no attribute {name!r}")
