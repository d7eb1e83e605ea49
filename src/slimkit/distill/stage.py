"""The ``distill`` recipe stage: a student learns a text encoder's embeddings from text.

A recipe names the student (a shallower copy of the recipe's model, or another model
source) and where the text comes from; labels are never used, so the task's train texts
or any text file serve. The last ``validation_texts`` of them are held out: the student's
embeddings are compared with the teacher's on them (mean cosine) for early stopping and
for the report's before/after table. Where the texts are the task's and its train labels
are given, each evaluation also scores the task: a frozen head, fitted once on the
teacher's embeddings of training texts, classifies the student's embeddings of the
held-out texts (all from the train split; the test split is left for the measurements).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import nn

from slimkit.distill.api import distill
from slimkit.distill.config import DistillConfig, EarlyStopping, LossTerm
from slimkit.distill.students import shallow_transformer
from slimkit.distill.text import read_text_file, text_data
from slimkit.errors import ConfigError, DataError
from slimkit.measure.task import fit_head
from slimkit.registry import register
from slimkit.zoo.models import LoadedModel, load_model

VAL_METRIC = "val_cosine"
TASK_METRIC = "val_accuracy"
# The head behind the task-metric curve is fitted on at most this many training texts:
# enough for a stable logistic regression, cheap next to the distillation itself.
HEAD_TEXTS = 2000


class StudentSpec(BaseModel):
    """Which student learns.

    Attributes:
        layers: keep these encoder layers of the model being distilled (``[1, 3, 5]`` of
            six); the student starts from their weights, as DistilBERT's did.
        model: or another model source (zoo name, saved slimkit folder, Hugging Face
            directory, ``package.module:function``) whose output has the teacher's width.
        current: or the model the recipe has reached (pruned, say), which then learns back
            towards the recipe's unmodified model: recovery after compression.
        init: ``teacher`` keeps the weights it starts from; ``random`` re-initialises
            every layer first (a student trained from scratch, for comparison).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    layers: list[int] | None = Field(None, min_length=1)
    model: str | None = None
    current: bool = False
    init: str = Field("teacher", pattern="^(teacher|random)$")

    @model_validator(mode="after")
    def _one_source(self) -> StudentSpec:
        if sum((self.layers is not None, self.model is not None, self.current)) != 1:
            raise ValueError("give the student one of `layers` (a shallower copy of the model), `model` (a model "
                             "source) or `current: true` (the model so far, recovering towards the original)")
        if self.current and self.init == "random":
            raise ValueError("`current: true` keeps the model's weights; it cannot be combined with init: random")
        return self


class TextSource(BaseModel):
    """The text the student learns on (labels unused).

    Attributes:
        file: a UTF-8 file with one text per line; without it, the task's train texts.
        limit: use only the first ``limit`` texts.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    file: str | None = None
    limit: int | None = Field(None, ge=2)


class DistillStageConfig(DistillConfig):
    """Distil the recipe's model (the teacher) into a student, as a recipe stage.

    Every :class:`DistillConfig` field applies (optimizer, schedule, epochs, ...). The
    losses default to the cosine between the two sentence embeddings; with a shallow
    student, ``hidden_weight`` adds a cosine between each kept layer's output and the
    teacher layer it came from.

    Attributes:
        student: the student to build.
        texts: where the training text comes from.
        validation_texts: held out from the end of the texts for evaluation and early
            stopping (0: no evaluation, no early stopping).
        hidden_weight: weight of the hidden-state term for shallow students (0: none).
        max_len: tokens per text.
    """

    kind = "distill"
    method = "kd"
    student: StudentSpec
    texts: TextSource = Field(default_factory=TextSource)
    validation_texts: int = Field(500, ge=0)
    hidden_weight: float = Field(1.0, ge=0)
    max_len: int = Field(128, ge=4)
    losses: list[LossTerm] = Field(default_factory=lambda: [LossTerm(kind="output_cosine")], min_length=1)
    lr: float = Field(1e-4, gt=0)
    early_stopping: EarlyStopping | None = Field(default_factory=lambda: EarlyStopping(metric=VAL_METRIC, patience=2))

    @model_validator(mode="after")
    def _stopping_needs_validation(self) -> DistillStageConfig:
        if self.early_stopping is not None and self.validation_texts == 0:
            raise ValueError("early_stopping needs held-out texts: set validation_texts > 0 or early_stopping: null")
        if self.early_stopping is not None and self.early_stopping.metric != VAL_METRIC:
            raise ValueError(f"early_stopping.metric: the stage evaluates {VAL_METRIC!r} only")
        try:  # the trainer's own checks, on the losses the stage will really use
            self.training_config()
        except ValidationError as err:
            raise ValueError("; ".join(e["msg"] for e in err.errors())) from None
        return self

    def training_config(self) -> DistillConfig:
        """The plain trainer config: these fields, plus the automatic hidden-state term."""
        losses = list(self.losses)
        if self.student.layers and self.hidden_weight > 0:
            layers = {f"backbone.encoder.layer.{i}": f"backbone.encoder.layer.{t}" for i, t in enumerate(self.student.layers)}
            losses.append(LossTerm(kind="hidden_cosine", weight=self.hidden_weight, layers=layers))
        fields = {k: getattr(self, k) for k in DistillConfig.model_fields if k != "losses"}
        return DistillConfig(**{**fields, "losses": losses})


def build_student(teacher: LoadedModel, spec: StudentSpec, seed: int,
                  load: Callable[[str], LoadedModel] = load_model) -> LoadedModel:
    """The student ``spec`` describes, built from (and never sharing weights with) ``teacher``.

    ``load`` loads ``spec.model``; the runner passes :func:`slimkit.load_model`, which
    also takes folders saved by :func:`slimkit.save` (it sits above the stages).
    """
    student = shallow_transformer(teacher, spec.layers) if spec.layers else load(spec.model)
    if spec.init == "random":
        torch.manual_seed(seed)
        for module in student.module.modules():
            if module is not student.module and hasattr(module, "reset_parameters"):
                module.reset_parameters()
        student.spec = {k: v for k, v in student.spec.items() if k != "initialised_from_layers"}
    # A teacher that was distilled from before is frozen; its copy must learn.
    for p in student.module.parameters():
        p.requires_grad_(True)
    return student


def _embed(module: nn.Module, batches: list[dict[str, torch.Tensor]], device: torch.device) -> torch.Tensor:
    module.eval()
    with torch.inference_mode():
        return torch.cat([module(**{k: v.to(device) for k, v in b.items()}).float().cpu() for b in batches])


def _batches(tokenizer, texts: list[str], max_len: int, size: int = 64) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(0, len(texts), size):
        enc = tokenizer(texts[i:i + size], truncation=True, max_length=max_len, padding="longest", return_tensors="pt")
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                    "token_type_ids": torch.zeros_like(enc["input_ids"])})
    return out


def run_distill_stage(current: LoadedModel, config: DistillStageConfig, train_texts: list[str] | None,
                      checkpoint_dir: Path | None = None, device: str | torch.device = "cpu",
                      progress: bool = True, original: LoadedModel | None = None,
                      train_labels: Sequence[int] | None = None,
                      load: Callable[[str], LoadedModel] = load_model,
                      strategy: Any = None) -> tuple[LoadedModel, dict[str, Any]]:
    """Build the student, distil the teacher into it, and return it with a training record.

    Args:
        current: the model the recipe has reached so far (PyTorch, not exported): the
            teacher, or with ``student.current`` the student itself.
        config: the stage.
        train_texts: the task's train texts, used when ``config.texts.file`` is not set.
        checkpoint_dir: where resumable checkpoints go; a rerun resumes from them.
        original: the recipe's unmodified model, the teacher of a ``student.current`` stage.
        train_labels: the labels of ``train_texts``; with them (and held-out texts) every
            evaluation also reports the task metric ``val_accuracy``. Ignored when the
            stage reads a text file.
        load: loads a ``student.model`` source (see :func:`build_student`).
        strategy: this process's part in parallel training (:mod:`slimkit.parallel`).

    Returns:
        The student, and ``{"steps", "seconds", "history", "evals", "best", "before",
        "stopped_early", ...}`` for the run folder and report.

    Raises:
        ConfigError: ``config.student.current`` is set but ``original`` is not given, or
            the teacher has no tokenizer (the stage distils text encoders).
        DataError: no text, or fewer texts than ``validation_texts`` needs.
    """
    if config.student.current:
        if original is None:
            raise ConfigError("distill: student.current learns from the recipe's original model, which was not given")
        teacher, student = original, current
        for p in student.module.parameters():
            p.requires_grad_(True)
    else:
        teacher, student = current, None
    if teacher.tokenizer is None:
        raise ConfigError("distill: the model has no tokenizer; the distill stage distils text encoders")
    if config.texts.file:
        texts, labels = read_text_file(config.texts.file), None
    else:
        texts = list(train_texts or [])
        labels = list(train_labels) if train_labels is not None else None
        if labels is not None and len(labels) != len(texts):
            raise DataError(f"distill: {len(texts)} train texts but {len(labels)} labels")
    keep = [i for i, t in enumerate(texts) if t and t.strip()][: config.texts.limit]
    texts = [texts[i] for i in keep]
    labels = [labels[i] for i in keep] if labels is not None else None
    n_val = config.validation_texts
    if len(texts) < n_val + 2:
        raise DataError(f"distill: {len(texts)} texts, but validation_texts is {n_val}; give more text or lower validation_texts")
    train, val = (texts[:-n_val], texts[-n_val:]) if n_val else (texts, [])
    device = torch.device(device)
    if student is None:
        student = build_student(teacher, config.student, config.seed, load)
    teacher.module.to(device)
    student.module.to(device)

    evaluate = None
    before = None
    head_texts: list[str] = []
    if val:
        val_batches = _batches(teacher.tokenizer, val, config.max_len)
        reference = _embed(teacher.module, val_batches, device)
        head = None
        head_labels = labels[: min(len(train), HEAD_TEXTS)] if labels is not None else []
        if len(set(head_labels)) > 1:  # the task metric, where labels allow it
            head_texts = train[: len(head_labels)]
            teacher_emb = _embed(teacher.module, _batches(teacher.tokenizer, head_texts, config.max_len), device)
            head = fit_head(teacher_emb.numpy(), np.asarray(head_labels))
            val_labels = np.asarray(labels[len(train):])

        def evaluate(model: nn.Module) -> dict[str, float]:
            emb = _embed(model, val_batches, device)
            metrics = {VAL_METRIC: float(torch.nn.functional.cosine_similarity(emb, reference, dim=-1).mean())}
            if head is not None:
                metrics[TASK_METRIC] = float((head.predict(emb.numpy()) == val_labels).mean())
            return metrics

        before = evaluate(student.module)
    data = text_data(teacher.tokenizer, train, config.max_len)
    # Counted before training: a pipeline stage holds its own layers only afterwards.
    parameters = {"teacher": _count(teacher.module), "student": _count(student.module)}
    started = time.perf_counter()
    result = distill(teacher.module, student.module, data, config.training_config(), evaluate=evaluate,
                     checkpoint_dir=checkpoint_dir, device=device, progress=progress, strategy=strategy)
    record = {
        "student": config.student.model_dump(mode="json"),
        "train_texts": len(train), "validation_texts": len(val),
        "head_texts": len(head_texts),
        "steps": result.steps, "seconds": result.seconds, "wall_seconds": time.perf_counter() - started,
        "stopped_early": result.stopped_early, "best": result.best, "before": before,
        "history": _thin(result.history), "evals": result.evals,
        "parameters": parameters,
    }
    return student, record


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _thin(history: list[dict[str, Any]], keep: int = 400) -> list[dict[str, Any]]:
    """At most ``keep`` points of the loss curve, each the mean of the steps it covers."""
    if len(history) <= keep:
        return history
    edges = np.linspace(0, len(history), keep + 1).astype(int)
    out = []
    for a, b in zip(edges[:-1], edges[1:], strict=True):
        chunk = history[a:b]
        point = {k: float(np.mean([h[k] for h in chunk])) for k in chunk[0] if k not in ("step", "epoch")}
        out.append({"step": chunk[-1]["step"], "epoch": chunk[-1]["epoch"], **point})
    return out


@register(DistillStageConfig)
def _replay(model: nn.Module, config: DistillStageConfig, **_) -> list[str]:
    # A saved student is rebuilt from its own architecture description; the stage that
    # made it has nothing to redo when it is loaded.
    return []
