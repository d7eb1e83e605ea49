"""Typed configuration of supervised training (fine-tuning and recovery after compression)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from slimkit.config import SlimConfig
from slimkit.distill.config import DistillConfig, EarlyStopping, LossTerm

VAL_METRIC = "val_accuracy"


class TrainConfig(SlimConfig):
    """Train a classifier on the task's labels, early-stopped on images held out from train.

    The loop is the distillation trainer's (:class:`slimkit.distill.trainer.Distiller`):
    resumable checkpoints, seeded shuffling, schedules, gradient accumulation. With
    ``teacher: baseline`` the loss adds the softened logits of the run's baseline (the
    fine-tuned model before compression), which recovers a pruned model faster than
    labels alone.

    Attributes:
        epochs: passes over the training images; unset, one pass, or as many as
            ``max_steps`` needs.
        max_steps: stop after this many optimizer steps, if set (a budget in images is
            ``max_steps * batch_size``).
        batch_size: images per optimizer step (times ``grad_accum``).
        optimizer, lr, weight_decay, momentum, schedule, warmup_steps, grad_accum,
            max_grad_norm, bf16, seed: as in :class:`slimkit.distill.DistillConfig`.
        validation: train images held out (seeded) for evaluation and early stopping: a
            count, or a fraction of the train split.
        eval_every: evaluate every N optimizer steps (0: once per epoch).
        checkpoint_every: write a resumable checkpoint every N steps (0: at each evaluation).
        patience: stop after this many evaluations without a better validation accuracy
            (None: train the whole budget); the best evaluation's weights are kept.
        head: ``auto`` gives the model a new, freshly initialised classifier when its last
            Linear layer's outputs do not match the task's classes (transfer learning from
            an ImageNet backbone); ``keep`` never changes it.
        teacher: ``none`` trains on labels only; ``baseline`` also distils the run's
            baseline model (softened logits, ``kd_weight`` and ``temperature``).
        hard_weight: weight of the cross-entropy on labels.
        kd_weight: weight of the distillation term when ``teacher`` is ``baseline``.
        temperature: softening of the teacher's and student's logits.
    """

    kind = "train"
    method = "supervised"
    epochs: int | None = Field(None, ge=1)
    max_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(64, ge=1)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    grad_accum: int = Field(1, ge=1)
    max_grad_norm: float | None = Field(None, gt=0)
    bf16: bool = False
    seed: int = 0
    validation: int | float = Field(0.1, gt=0)
    eval_every: int = Field(0, ge=0)
    checkpoint_every: int = Field(0, ge=0)
    patience: int | None = Field(3, ge=1)
    head: Literal["auto", "keep"] = "auto"
    teacher: Literal["none", "baseline"] = "none"
    hard_weight: float = Field(1.0, ge=0)
    kd_weight: float = Field(1.0, ge=0)
    temperature: float = Field(4.0, gt=0)

    @model_validator(mode="after")
    def _checks(self) -> TrainConfig:
        if isinstance(self.validation, float) and not self.validation < 1:
            raise ValueError("validation: a fraction of the train split must be below 1 (or give a count of images)")
        if self.teacher == "none" and self.hard_weight == 0:
            raise ValueError("hard_weight: 0 leaves nothing to learn from without a teacher; set teacher: baseline")
        return self

    def validation_count(self, n_train: int) -> int:
        """How many of ``n_train`` images are held out."""
        n = round(self.validation * n_train) if isinstance(self.validation, float) else int(self.validation)
        return max(1, n)

    def training_config(self) -> DistillConfig:
        """The trainer's config: cross-entropy on labels, plus the teacher's soft logits."""
        losses = [LossTerm(kind="hard_ce", weight=self.hard_weight)] if self.hard_weight else []
        if self.teacher == "baseline" and self.kd_weight:
            losses.append(LossTerm(kind="soft_kl", weight=self.kd_weight, temperature=self.temperature))
        stopping = EarlyStopping(metric=VAL_METRIC, mode="max", patience=self.patience) if self.patience else None
        return DistillConfig(
            losses=losses, optimizer=self.optimizer, lr=self.lr, weight_decay=self.weight_decay,
            momentum=self.momentum, schedule=self.schedule, warmup_steps=self.warmup_steps,
            # Every epoch has at least one step, so max_steps epochs always reach max_steps.
            epochs=self.epochs or self.max_steps or 1,
            max_steps=self.max_steps, batch_size=self.batch_size, grad_accum=self.grad_accum,
            max_grad_norm=self.max_grad_norm, eval_every=self.eval_every,
            checkpoint_every=self.checkpoint_every or self.eval_every, early_stopping=stopping, bf16=self.bf16,
            seed=self.seed,
        )
