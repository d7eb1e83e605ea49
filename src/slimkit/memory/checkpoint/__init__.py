"""Activation checkpointing chosen to meet a memory budget, optionally with bf16 autocast.

A checkpointed block keeps only its inputs during the forward and runs its forward again
in the backward to rebuild what its backward needs: memory for compute. Which blocks to
checkpoint is a trade: each saves some bytes and costs one more forward of the block.

    profile = profile_checkpointing(model, batch, loss_fn)    # measure once
    plan = plan_checkpointing(model, batch, loss_fn, "1.5GiB", profile=profile)
    handle = checkpoint_(model, plan)                         # train ...
    handle.remove()                                           # ... and undo

The profile comes from measured steps, not from formulas: one step timed per block, one
step whose live tensor storages are followed through the forward and backward (see
:mod:`slimkit.memory.peak`), and one step with every block checkpointed. From these it
predicts the peak of any choice of blocks; the plan picks the choice that meets the
budget with the least recompute time, then measures it and adds blocks if the
measurement is over.

The package is split by concern, each module depending only on those above it:

- :mod:`~slimkit.memory.checkpoint.config`: :class:`CheckpointConfig`;
- :mod:`~slimkit.memory.checkpoint.steps`: running a training step to measure it;
- :mod:`~slimkit.memory.checkpoint.timing`: timing steps and blocks;
- :mod:`~slimkit.memory.checkpoint.cost_model`: :class:`BlockProfile` and
  :class:`CheckpointProfile`, the predictions and the choice for a budget;
- :mod:`~slimkit.memory.checkpoint.blocks`: :func:`resolve_blocks`;
- :mod:`~slimkit.memory.checkpoint.wrap`: the checkpointed and autocast forwards, put on
  and taken off;
- :mod:`~slimkit.memory.checkpoint.profiling`: :func:`profile_checkpointing`;
- :mod:`~slimkit.memory.checkpoint.planner`: :func:`plan_checkpointing` and :class:`CheckpointPlan`;
- :mod:`~slimkit.memory.checkpoint.apply`: :func:`checkpoint_`, :class:`CheckpointHandle`,
  :func:`remove_checkpointing_` and :func:`checkpointed_blocks`.
"""

from slimkit.memory.checkpoint.apply import (
    CheckpointHandle,
    checkpoint_,
    checkpointed_blocks,
    remove_checkpointing_,
)
from slimkit.memory.checkpoint.blocks import resolve_blocks
from slimkit.memory.checkpoint.config import CheckpointConfig
from slimkit.memory.checkpoint.cost_model import EXACT_MAX_BLOCKS, BlockProfile, CheckpointProfile
from slimkit.memory.checkpoint.planner import CheckpointPlan, plan_checkpointing
from slimkit.memory.checkpoint.profiling import profile_checkpointing
from slimkit.memory.checkpoint.steps import Batch, LossFn

__all__ = [
    "EXACT_MAX_BLOCKS",
    "Batch",
    "BlockProfile",
    "CheckpointConfig",
    "CheckpointHandle",
    "CheckpointPlan",
    "CheckpointProfile",
    "LossFn",
    "checkpoint_",
    "checkpointed_blocks",
    "plan_checkpointing",
    "profile_checkpointing",
    "remove_checkpointing_",
    "resolve_blocks",
]
