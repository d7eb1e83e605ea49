"""Memory: where it goes (profiler), how to plan it (activation arena), how to trade
compute for it (checkpointing to a budget) and how to share it (memory-mapped weights,
a content-addressed weight store).

The names below are imported on first use, so ``import slimkit.memory`` stays cheap.
"""

from __future__ import annotations

from slimkit.lazy import lazy_getattr

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

__getattr__ = lazy_getattr(__name__, _EXPORTS)
