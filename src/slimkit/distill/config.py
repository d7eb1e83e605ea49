"""Typed configuration of a distillation run."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from slimkit.config import SlimConfig

HIDDEN_KINDS = ("hidden_mse", "hidden_cosine")
ATTENTION_KINDS = ("attention_kl", "value_relation_kl")
# Terms that compare the two models' final outputs.
OUTPUT_KINDS = ("soft_kl", "output_mse", "output_cosine")


class LossTerm(BaseModel):
    """One weighted term of the distillation loss.

    Attributes:
        kind: ``soft_kl`` (teacher's softened logits), ``hard_ce`` (labels),
            ``output_mse`` / ``output_cosine`` (the models' outputs, e.g. pooled sentence
            embeddings), ``hidden_mse`` / ``hidden_cosine`` (outputs of inner layers, CNN
            feature maps included), ``attention_kl`` (self-attention distributions, MiniLM)
            and ``value_relation_kl`` (value-value relations, MiniLM); see
            :mod:`slimkit.distill.attention`.
        weight: the term's weight in the sum.
        temperature: softening of ``soft_kl``; must be > 0.
        layers: for hidden and attention terms, which teacher layer each student layer
            learns from, ``{student qualified name: teacher qualified name}``. Attention
            terms name attention modules (``backbone.encoder.layer.0.attention.self`` in a
            BERT-family encoder), whose query/key/value projections are captured.
        projection: for hidden terms, learn a linear map (a 1x1 convolution for feature
            maps) from the student's width to the teacher's when they differ.
        relation_heads: for attention terms, concatenate each side's heads and split them
            again into this many relation heads (MiniLMv2), so that models with different
            head counts can be compared; it must divide both models' widths. Without it
            the student and teacher layers must have the same number of heads.
        qkv: for attention terms, the names of the attention module's query, key and value
            projection children (``q_lin``, ``k_lin``, ``v_lin`` in DistilBERT).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["soft_kl", "hard_ce", "output_mse", "output_cosine", "hidden_mse", "hidden_cosine",
                  "attention_kl", "value_relation_kl"]
    weight: float = Field(1.0, ge=0)
    temperature: float = Field(1.0, gt=0)
    layers: dict[str, str] = Field(default_factory=dict)
    projection: bool = False
    relation_heads: int | None = Field(None, ge=1)
    qkv: tuple[str, str, str] = ("query", "key", "value")

    @model_validator(mode="after")
    def _fields_fit_the_kind(self) -> LossTerm:
        layered = self.kind in HIDDEN_KINDS or self.kind in ATTENTION_KINDS
        if layered and not self.layers:
            raise ValueError(f"a {self.kind} term needs `layers`: {{student layer: teacher layer}}")
        if not layered and self.layers:
            raise ValueError(f"`layers` applies to hidden_* and attention terms, not {self.kind}")
        if self.projection and self.kind not in HIDDEN_KINDS:
            raise ValueError(f"`projection` applies to hidden_* terms, not {self.kind}")
        if self.kind not in ATTENTION_KINDS:
            if self.relation_heads is not None:
                raise ValueError(f"`relation_heads` applies to attention_kl and value_relation_kl, not {self.kind}")
            if self.qkv != ("query", "key", "value"):
                raise ValueError(f"`qkv` applies to attention_kl and value_relation_kl, not {self.kind}")
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
        cache_teacher: compute the frozen teacher's outputs once for the whole dataset and
            reuse them every epoch: ``"none"``, ``"memory"`` or ``"disk"`` (a safetensors
            file, memory-mapped, reused by later runs while the teacher, the data and what
            the cache holds are unchanged; see :mod:`slimkit.distill.cache`). ``True``
            means ``"memory"`` and ``False`` ``"none"``. Only with output terms: hidden and
            attention terms would need every layer's activations kept.
        cache_dir: the folder of the disk cache; defaults to the run's ``checkpoint_dir``.
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
    cache_teacher: Literal["none", "memory", "disk"] = "none"
    cache_dir: str | None = None
    seed: int = 0

    @field_validator("cache_teacher", mode="before")
    @classmethod
    def _cache_from_bool(cls, value: object) -> object:
        # Configs written before the disk cache existed said true / false.
        if isinstance(value, bool):
            return "memory" if value else "none"
        return value

    @model_validator(mode="after")
    def _cache_only_outputs(self) -> DistillConfig:
        if self.teacher_cache_mode != "none" and any(t.layers for t in self.losses):
            raise ValueError("cache_teacher keeps only the teacher's outputs; it cannot serve hidden_* or attention terms")
        if self.cache_dir is not None and self.teacher_cache_mode != "disk":
            raise ValueError("cache_dir applies to cache_teacher='disk'; set cache_teacher: disk or remove cache_dir")
        return self

    @property
    def teacher_cache_mode(self) -> Literal["none", "memory", "disk"]:
        """``cache_teacher`` as one of its three modes (``model_copy`` skips validation, so a bool may remain)."""
        value = self.cache_teacher
        if isinstance(value, bool):
            return "memory" if value else "none"
        return value
