"""The ``distill`` verb."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from slimkit.distill.config import DistillConfig
from slimkit.distill.trainer import DistillData, Distiller, DistillResult
from slimkit.parallel.strategy import Single


def distill(
    teacher: nn.Module | None,
    student: nn.Module,
    data: DistillData,
    config: DistillConfig,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    checkpoint_dir: str | Path | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    on_step: Callable[[int, nn.Module], None] | None = None,
    strategy: Single | None = None,
) -> DistillResult:
    """Train ``student`` (in place) to match the frozen ``teacher`` on ``data``.

    Args:
        teacher: the model to learn from; it is put in eval mode and never updated.
            ``None`` trains on labels alone (only ``hard_ce`` terms), through the same
            loop, so that a baseline gets exactly the same training machinery.
        student: the model that learns; its weights are updated in place and, with
            early stopping, set to the best evaluation's weights at the end.
        data: training examples (train split only).
        config: losses, optimizer, schedule, batch sizes, stopping.
        evaluate: ``student -> {metric: value}``, called every ``eval_every`` steps or
            each epoch; needed for early stopping.
        checkpoint_dir: where resumable checkpoints go; if it holds one from the same
            config, the run resumes from it and ends as the uninterrupted run would.
        device: defaults to CUDA when available.
        progress: draw a progress bar with the loss.
        on_step: ``(step, student) -> None``, called after each optimizer step (``step``
            counts steps done, from 1), before evaluation and checkpointing; e.g. a
            :class:`slimkit.prune.magnitude.GradualPruner` raising the sparsity on schedule.
        strategy: how this process takes part in parallel training (a strategy of
            :mod:`slimkit.parallel`, in a worker it launched); one process by default.
            Under a strategy ``on_step`` sees this process's student: sharded (fsdp,
            tp) or holding one stage (pipeline).

    Returns:
        The losses per step, the evaluations, the best one and whether it stopped early.

    Raises:
        ConfigError: mismatched shapes with no projection, early stopping without an
            evaluation, a checkpoint from another config.
        LayerSelectionError: the layer map names a layer that does not exist.
        DataError: empty data, or labels missing for a hard-label term.
        NonFiniteLoss: the loss became NaN or inf (the last checkpoint is kept).
    """
    return Distiller(teacher, student, data, config, evaluate, checkpoint_dir, device, progress, on_step,
                     strategy).run()
