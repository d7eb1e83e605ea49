"""Applying checkpointing and removing it: :func:`checkpoint_` (with a plan, or a config
planned first), its :class:`CheckpointHandle`, :func:`remove_checkpointing_` and
:func:`checkpointed_blocks`."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from slimkit.errors import ConfigError
from slimkit.memory.checkpoint.blocks import resolve_blocks
from slimkit.memory.checkpoint.config import CheckpointConfig
from slimkit.memory.checkpoint.planner import CheckpointPlan, plan_checkpointing
from slimkit.memory.checkpoint.steps import Batch, LossFn
from slimkit.memory.checkpoint.wrap import _AutocastForward, _CheckpointedForward, _unwrap, _wrap


@dataclass
class CheckpointHandle:
    """What :func:`checkpoint_` changed; ``remove()`` puts the model back."""

    model: nn.Module
    blocks: list[str]
    autocast: str
    plan: CheckpointPlan | None = None
    policy: str = "full"

    def remove(self) -> None:
        """Undo: the blocks' and the model's ``forward`` are what they were before."""
        _unwrap(self.model)


def checkpoint_(
    model: nn.Module,
    plan_or_config: CheckpointPlan | CheckpointConfig | None = None,
    example_batch: Batch | None = None,
    loss_fn: LossFn | None = None,
) -> CheckpointHandle:
    """Checkpoint blocks of ``model`` in place, and optionally run it under bf16 autocast.

    Args:
        model: the model; its parameters and names do not change.
        plan_or_config: a :class:`CheckpointPlan` (its chosen blocks and autocast), or a
            :class:`CheckpointConfig`: without a budget every selected block is
            checkpointed; with one, the blocks are planned first, which needs
            ``example_batch`` and ``loss_fn`` (see :func:`plan_checkpointing`).
            ``None`` checkpoints every auto-detected block.

    Returns:
        A handle whose ``remove()`` undoes this; calling ``checkpoint_`` again replaces
        what an earlier call did.
    """
    plan, policy = None, "full"
    if isinstance(plan_or_config, CheckpointPlan):
        plan = plan_or_config
        names, autocast = plan.chosen, plan.autocast
    else:
        config = plan_or_config or CheckpointConfig()
        policy = config.policy
        if config.budget is None:
            names, autocast = resolve_blocks(model, config.blocks), config.autocast
        else:
            if example_batch is None or loss_fn is None:
                raise ConfigError("a budget needs a plan, and planning runs training steps: pass example_batch "
                                  "and loss_fn to checkpoint_, or pass a plan from plan_checkpointing")
            plan = plan_checkpointing(model, example_batch, loss_fn, config=config)
            names, autocast = plan.chosen, plan.autocast
    _unwrap(model)
    _wrap(model, names, autocast, policy)
    return CheckpointHandle(model, list(names), autocast, plan, policy)


def remove_checkpointing_(model: nn.Module) -> None:
    """Undo every :func:`checkpoint_` on ``model`` (when its handle is not at hand)."""
    _unwrap(model)


def checkpointed_blocks(model: nn.Module) -> list[str]:
    """Qualified names of the blocks of ``model`` that :func:`checkpoint_` wrapped."""
    return [n for n, m in model.named_modules() if isinstance(m.__dict__.get("forward"), _CheckpointedForward)]


def checkpointing_of(model: nn.Module) -> dict[str, object] | None:
    """What :func:`checkpoint_` did to ``model`` (``blocks``, ``autocast``, ``policy``), as
    JSON, or None: another process rebuilds it with :func:`reapply_checkpointing_`."""
    blocks = [(n, m.__dict__["forward"]) for n, m in model.named_modules()
              if isinstance(m.__dict__.get("forward"), _CheckpointedForward)]
    autocast = "bf16" if isinstance(model.__dict__.get("forward"), _AutocastForward) else "none"
    if not blocks and autocast == "none":
        return None
    policy = blocks[0][1].policy if blocks else "full"
    return {"blocks": [n for n, _ in blocks], "autocast": autocast, "policy": policy}


def reapply_checkpointing_(model: nn.Module, state: dict[str, object] | None) -> None:
    """Checkpoint ``model`` as :func:`checkpointing_of` described another copy of it."""
    if state:
        _unwrap(model)
        _wrap(model, list(state["blocks"]), str(state["autocast"]), str(state["policy"]))
