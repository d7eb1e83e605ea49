"""Typed configuration of a distillation run."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from slimkit.config import SlimConfig


class LossTerm(BaseModel):
    """One weighted term of the distillation loss.

    Attributes:
        kind: ``soft_kl`` (teacher's softened logits), ``hard_ce`` (labels),
            ``output_mse`` / ``output_cosine`` (the models' outputs, e.g. pooled sentence
            embeddings), ``hidden_mse`` / ``hidden_cosine`` (outputs of inner layers, CNN
            feature maps included).
        weight: the term's weight in the sum.
        temperature: softening of ``soft_kl``; must be > 0.
        layers: for hidden terms, which teacher layer each student layer learns from,
            ``{student qualified name: teacher qualified name}``.
        projection: for hidden terms, learn a linear map (a 1x1 convolution for feature
            maps) from the student's width to the teacher's when they differ.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["soft_kl", "hard_ce", "output_mse", "output_cosine", "hidden_mse", "hidden_cosine"]
    weight: float = Field(1.0, ge=0)
    temperature: float = Field(1.0, gt=0)
    layers: dict[str, str] = Field(default_factory=dict)
    projection: bool = False

    @model_validator(mode="after")
    def _layers_only_for_hidden(self) -> LossTerm:
        if self.kind.startswith("hidden_") and not self.layers:
            raise ValueError(f"a {self.kind} term needs `layers`: {{student layer: teacher layer}}")
        if not self.kind.startswith("hidden_") and self.layers:
            raise ValueError(f"`layers` applies to hidden_* terms, not {self.kind}")
        return self


class EarlyStopping(BaseModel):
    """Stop when ``metric`` (from the evaluation function) has not improved for ``patience`` evaluations."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    metric: str
    mode: Literal["max", "min"] = "max"
    patience: int = Field(5, ge=1)


class DistillConfig(SlimConfig):
    """Knowledge distillation: a student learns from a frozen teacher.

    Attributes:
        losses: the weighted loss terms.
        optimizer: ``adamw`` or ``sgd`` (with momentum).
        schedule: learning-rate schedule over the whole run, after ``warmup_steps``.
        epochs: passes over the training data.
        max_steps: stop after this many optimizer steps, if set.
        batch_size: examples per micro-batch; ``grad_accum`` micro-batches make a step.
        eval_every: evaluate every N optimizer steps (0: at the end of each epoch).
        checkpoint_every: write a resumable checkpoint every N steps (0: each epoch).
        bf16: compute under bfloat16 autocast where the device supports it.
        cache_teacher: compute the frozen teacher's outputs once for the whole dataset
            and reuse them every epoch (only with output terms; hidden terms would need
            every layer's activations kept).
        seed: seeds shuffling, dropout and initialisation of projections.
    """

    kind = "distill"
    method = "kd"
    losses: list[LossTerm] = Field(min_length=1)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(32, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_grad_norm: float | None = Field(None, gt=0)
    eval_every: int = Field(0, ge=0)
    checkpoint_every: int = Field(0, ge=0)
    early_stopping: EarlyStopping | None = None
    bf16: bool = False
    cache_teacher: bool = False
    seed: int = 0

    @model_validator(mode="after")
    def _cache_only_outputs(self) -> DistillConfig:
        if self.cache_teacher and any(t.layers for t in self.losses):
            raise ValueError("cache_teacher keeps only the teacher's outputs; it cannot serve hidden_* terms")
        return self
