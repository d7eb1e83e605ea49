"""The ``train`` recipe stage: supervised training of an image classifier on the task's train split.

The stage holds out ``validation`` train images (seeded) for evaluation and early
stopping, gives a pretrained model a new head when its classes differ from the task's,
and trains the rest through :func:`slimkit.train.train_`. The test split is never seen.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from slimkit.errors import ConfigError, DataError
from slimkit.quantize.api import record_transform
from slimkit.registry import register
from slimkit.train.api import train_
from slimkit.train.config import TrainConfig
from slimkit.train.head import HeadConfig, classifier_layer, replace_head_


def run_train_stage(current: Any, config: TrainConfig, workload: Any, checkpoint_dir: Path | None = None,
                    device: str | torch.device = "cpu", progress: bool = True,
                    baseline: Any = None, strategy: Any = None) -> dict[str, Any]:
    """Train ``current`` (a :class:`slimkit.zoo.models.LoadedModel`) in place on ``workload``'s train split.

    Args:
        current: the model the recipe has reached (PyTorch, not exported).
        config: the stage.
        workload: an image workload (:class:`slimkit.measure.image_workload.ImageWorkload`).
        checkpoint_dir: resumable checkpoints; a rerun of the recipe resumes from them.
        baseline: the run's baseline model, the teacher of ``teacher: baseline``.
        strategy: this process's part in parallel training (:mod:`slimkit.parallel`).

    Returns:
        The training record for the run folder and report.

    Raises:
        ConfigError: a text task (use ``distill``), or ``teacher: baseline`` without a baseline.
        DataError: too few train images for the validation split.
    """
    if getattr(workload, "kind", None) != "image":
        raise ConfigError("train: supervised training needs a classifier with labelled images (an image task); "
                          "a text encoder learns through the distill stage")
    module = current.module
    head = None
    if config.head == "auto":
        name = classifier_layer(module)
        if module.get_submodule(name).out_features != workload.num_classes:
            head = HeadConfig(classes=workload.num_classes, seed=config.seed, layer=name)
            replace_head_(module, head)
            record_transform(module, head, [name])
            _set_spec_classes(current, workload.num_classes)
    n_train = len(workload.data.train_y)
    n_val = config.validation_count(n_train)
    if n_val >= n_train - 1:
        raise DataError(f"train: validation holds out {n_val} of {n_train} train images; lower validation "
                        "or raise task.train_limit")
    tx, ty, vx, vy = workload.held_out(n_val, config.seed)
    evaluate = workload.evaluator(vx, vy)
    teacher = None
    if config.teacher == "baseline":
        if baseline is None:
            raise ConfigError("train: teacher: baseline needs the run's baseline model")
        teacher = baseline.module.to(memory_format=torch.channels_last)
    device = torch.device(device)
    module.to(device)
    # The model may be a copy of a frozen teacher (the baseline, after an earlier stage
    # distilled from it): everything in it trains.
    for p in module.parameters():
        p.requires_grad_(True)
    frozen = [(p, p.requires_grad) for p in teacher.parameters()] if teacher is not None else []
    before = evaluate(module)["val_accuracy"]
    # Channels-last makes depthwise and 1x1 convolutions several times faster on CPU (oneDNN).
    module.to(memory_format=torch.channels_last)
    started = time.perf_counter()
    try:
        result = train_(module, config, workload.training_data(tx, ty), evaluate, teacher, checkpoint_dir,
                        device, progress, strategy)
    finally:
        # safetensors stores contiguous tensors; the saved model has the standard layout.
        module.to(memory_format=torch.contiguous_format)
        if teacher is not None:
            teacher.to(memory_format=torch.contiguous_format)
            for p, flag in frozen:  # the trainer froze the teacher; the baseline is left as it was
                p.requires_grad_(flag)
    module.eval()
    return {
        "kind": "train", "train_images": len(ty), "validation_images": len(vy),
        "head": head.to_dict() if head else None, "teacher": config.teacher,
        "steps": result.steps, "images_seen": result.steps * config.batch_size * config.grad_accum,
        "seconds": result.seconds, "wall_seconds": time.perf_counter() - started,
        "stopped_early": result.stopped_early, "best": result.best,
        "before": {"val_accuracy": before}, "evals": result.evals,
        "history": _thin(result.history),
    }


def _set_spec_classes(model: Any, classes: int) -> None:
    # A description with a class count (the zoo's MobileNetV2) rebuilds the new head's
    # shape directly; other descriptions get it from the recorded head transform.
    if "num_classes" in model.spec:
        model.spec = {**model.spec, "num_classes": classes}


def _thin(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from slimkit.distill.stage import _thin as thin

    return thin(history)


@register(TrainConfig)
def _replay(model, config: TrainConfig, **_) -> list[str]:
    # Training changes weights only, which the saved file holds; a new head is recorded
    # as its own transform. Nothing to redo on loading.
    return []
