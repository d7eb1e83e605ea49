"""The ``train_`` verb."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from slimkit.distill.trainer import DistillData, Distiller, DistillResult
from slimkit.errors import ConfigError
from slimkit.parallel.strategy import Single
from slimkit.train.config import TrainConfig


def train_(
    model: nn.Module,
    config: TrainConfig,
    data: DistillData,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    teacher: nn.Module | None = None,
    checkpoint_dir: str | Path | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    strategy: Single | None = None,
) -> DistillResult:
    """Train ``model`` in place on labelled ``data`` as ``config`` says.

    Args:
        model: the classifier; its weights are updated in place and, with early stopping,
            set to the best evaluation's weights at the end.
        config: optimizer, schedule, budget, early stopping, loss weights.
        data: inputs and labels from the train split (``data.labels`` is required).
        evaluate: ``model -> {"val_accuracy": ...}`` on held-out train images; needed
            when ``config.patience`` is set.
        teacher: the frozen model whose softened logits are learnt too, for
            ``config.teacher == "baseline"``.
        checkpoint_dir: resumable checkpoints; a rerun resumes from them.
        device: defaults to CUDA when available.
        progress: draw a progress bar.
        strategy: how this process takes part in parallel training (see
            :mod:`slimkit.parallel`); one process by default.

    Returns:
        The per-step losses, the evaluations and the best one.

    Raises:
        ConfigError: a teacher is needed but missing, or early stopping has no evaluation.
        DataError: the data has no labels.
    """
    if config.teacher == "baseline" and teacher is None:
        raise ConfigError("teacher: baseline distils the run's baseline model; pass teacher=<that model>")
    if config.patience and evaluate is None:
        raise ConfigError("patience (early stopping) needs an evaluation on held-out data: pass evaluate=..., "
                          "or set patience: null")
    return Distiller(teacher if config.teacher == "baseline" else None, model, data, config.training_config(),
                     evaluate, checkpoint_dir, device, progress, strategy=strategy).run()
