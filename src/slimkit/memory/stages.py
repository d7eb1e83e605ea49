"""The memory recipe stages: ``checkpoint`` (activation checkpointing for the training
stages that follow, planned to a budget) and ``arena`` (a pre-planned activation arena
that serves the variant)."""

from __future__ import annotations

from typing import Any

from torch import nn

from slimkit.memory.arena import ArenaConfig
from slimkit.memory.checkpoint import CheckpointConfig
from slimkit.registry import config_from_dict, register


class CheckpointStageConfig(CheckpointConfig):
    """Checkpoint blocks of the model while the recipe's next ``train`` or ``distill`` stages run.

    Every :class:`slimkit.memory.CheckpointConfig` field applies. With a ``budget`` the
    blocks are planned on one training batch of the next training stage's batch size,
    drawn from the task's train split. The checkpointing is removed before the model is
    exported, saved or measured: it changes how training spends memory, not the model.
    """

    kind = "checkpoint"
    method = "activations"


class ArenaStageConfig(ArenaConfig):
    """Serve the variant from one pre-allocated activation arena (see :class:`slimkit.memory.ArenaConfig`).

    Recorded with the model: the harness, the accuracy evaluation and the serving process
    that measures peak memory all run it through :func:`slimkit.memory.build_arena`.
    Without ``batch_buckets`` the recipe's measured batch sizes are planned; a request
    larger than the largest bucket is served in chunks of it.
    """

    kind = "arena"
    method = "plan"


@register(CheckpointStageConfig)
def _checkpoint(model: nn.Module, config: CheckpointStageConfig, example_batch: Any = None, loss_fn: Any = None,
                **_) -> list[str]:
    from slimkit.memory.checkpoint import checkpoint_

    return checkpoint_(model, config, example_batch, loss_fn).blocks


@register(ArenaStageConfig)
def _arena(model: nn.Module, config: ArenaStageConfig, **_) -> list[str]:
    # Nothing changes in the model: the arena is planned where the model is served, for
    # the inputs it is served with.
    return []


def arena_config(model: nn.Module) -> ArenaStageConfig | None:
    """The arena an ``arena`` stage recorded on ``model``, if any."""
    from slimkit.quantize.api import transforms_of

    found = [t["config"] for t in transforms_of(model) if t["config"]["kind"] == ArenaStageConfig.kind]
    return config_from_dict(found[-1]) if found else None
