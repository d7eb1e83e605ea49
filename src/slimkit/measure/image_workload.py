"""The image side of a run: test images at the model's input size, and top-1 accuracy.

An image classifier is scored by its own head: the fraction of the full test split whose
highest logit is the true class, and how often each variant predicts what the baseline
predicts. Training stages, calibration and the pruning analysis draw from the train
split only.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from slimkit.errors import ConfigError
from slimkit.measure.workload import Progress, Runner
from slimkit.zoo.images import ImageClassificationData, ImageInput, load_image_csv, load_image_task

# The name slimkit.export gives a non-text model's first input.
INPUT_NAME = "input_0"
EVAL_BATCH = 64


def is_image_task(task: Any) -> bool:
    """Whether a recipe's task is images: Fashion-MNIST, a folder, or a CSV naming an image column."""
    return task.source == "fashion-mnist" or task.image_column is not None or Path(task.source).is_dir()


def forward_keyword(module: nn.Module) -> str:
    """The name of the model's first input, by which training passes batches to it."""
    params = [p for p in inspect.signature(module.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if not params or params[0].kind is inspect.Parameter.POSITIONAL_ONLY:
        raise ConfigError(
            f"{type(module).__name__}.forward takes no named first input; image models are called as "
            "model(images), give forward a first parameter such as `def forward(self, x)`"
        )
    return params[0].name


@dataclass
class ImageWorkload:
    """An image-classification task for a model that maps ``[N, C, H, W]`` images to logits."""

    data: ImageClassificationData
    transform: ImageInput
    keyword: str
    kind: str = "image"

    @classmethod
    def from_spec(cls, task: Any, model: Any) -> ImageWorkload:
        size = task.image_size
        shape = None if size is None else (size, size) if isinstance(size, int) else tuple(size)
        if task.source == "fashion-mnist":
            data = load_image_task("fashion-mnist")
        elif task.image_column is not None:
            data = load_image_csv(task.source, image_column=task.image_column, label_column=task.label_column,
                                  color=task.color, size=shape)
        else:
            data = load_image_task(task.source, color=task.color, size=shape)
        data = data.limited(task.train_limit, task.test_limit)
        return cls(data, ImageInput(shape, task.channels, task.normalize), forward_keyword(model.module))

    @property
    def name(self) -> str:
        return self.data.name

    @property
    def num_classes(self) -> int:
        return len(self.data.label_names)

    def model_input(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        return self.transform(images)

    def timing_feed(self, batch: int) -> dict[str, np.ndarray]:
        x = self.data.test_x
        rows = np.resize(np.arange(len(x)), batch)  # repeats the test images if there are fewer
        return {INPUT_NAME: self.model_input(x[rows]).numpy()}

    def serve_feed(self) -> dict[str, np.ndarray]:
        return self.timing_feed(1)

    def calibration(self, n: int, framework: str = "onnx") -> list[Any]:
        xs = [self.model_input(self.data.train_x[i:i + 1]) for i in range(min(n, len(self.data.train_x)))]
        if framework == "onnx":
            return [{INPUT_NAME: x.numpy()} for x in xs]
        return [(x,) for x in xs]

    def torch_inputs(self, feed: dict[str, np.ndarray], device: str) -> tuple:
        return tuple(torch.from_numpy(v).to(device) for v in feed.values())

    def count_inputs(self, feed: dict[str, np.ndarray]) -> tuple:
        return tuple(torch.from_numpy(v[:1]) for v in feed.values())

    def example_input(self) -> torch.Tensor:
        """One train image at the model's input size, to trace the model with."""
        return self.model_input(self.data.train_x[:1])

    # -- learning from the train split ------------------------------------------------
    def held_out(self, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(train_x, train_y, val_x, val_y)``: ``n`` train images held out (seeded) for validation."""
        rest, (val_x, val_y) = self.data.validation_split(n, seed)
        return rest.train_x, rest.train_y, val_x, val_y

    def training_data(self, x: np.ndarray, y: np.ndarray):
        """Images and labels for the trainer: resized and normalised per batch (the whole
        split at the model's size could take gigabytes), channels-last for CPU speed."""
        from slimkit.distill.trainer import DistillData

        key, transform = self.keyword, self.model_input

        def collate(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {key: transform(inputs[key]).contiguous(memory_format=torch.channels_last)}

        return DistillData({key: torch.from_numpy(x)}, torch.from_numpy(y), collate)

    def evaluator(self, x: np.ndarray, y: np.ndarray, metric: str = "val_accuracy") -> Callable[[nn.Module], dict[str, float]]:
        """``model -> {metric: top-1 accuracy on (x, y)}``, in eval mode, on the model's device."""
        labels = torch.from_numpy(y)

        def evaluate(model: nn.Module) -> dict[str, float]:
            return {metric: float((self.predict_torch(model, x) == labels).float().mean())}

        return evaluate

    def predict_torch(self, model: nn.Module, x: np.ndarray) -> torch.Tensor:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                out = [model(self.model_input(x[i:i + EVAL_BATCH]).to(device)).argmax(1).cpu()
                       for i in range(0, len(x), EVAL_BATCH)]
        finally:
            model.train(was_training)
        return torch.cat(out)

    def training_example(self, batch_size: int) -> tuple[tuple[torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
        """One training batch (channels-last, as the train stage feeds it) and a loss of the
        logits, for planning activation checkpointing; labels do not change its memory."""
        x = self.data.train_x[np.resize(np.arange(len(self.data.train_x)), batch_size)]
        return ((self.model_input(x).contiguous(memory_format=torch.channels_last),),
                lambda logits: logits.float().logsumexp(1).mean())

    def loss_fn(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Cross-entropy of a labelled ``(images, labels)`` batch (for Taylor importance)."""
        x, y = batch
        p = next(model.parameters())
        return F.cross_entropy(model(x.to(p.device)), y.to(p.device))

    def labelled_batches(self, n: int, batch_size: int = 32, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``n`` random train images with their labels, in batches (for Taylor importance)."""
        x, y = self.data.train_x, self.data.train_y
        pick = np.random.default_rng(seed).permutation(len(x))[:n]
        return [(self.model_input(x[pick[i:i + batch_size]]), torch.from_numpy(y[pick[i:i + batch_size]]))
                for i in range(0, len(pick), batch_size)]

    # -- scoring on the test split ----------------------------------------------------
    def accuracy(self, runners: dict[str, Runner], baseline: str,
                 progress: Callable[[str, int], Progress]) -> dict[str, dict]:
        """Top-1 accuracy of each variant on the whole test split, its drop from
        ``baseline`` in points, and its agreement with ``baseline``'s predictions."""
        x, y = self.data.test_x, self.data.test_y
        preds: dict[str, np.ndarray] = {}
        for name in [baseline, *(n for n in runners if n != baseline)]:
            advance = progress(f"accuracy, {name}", len(x))
            out = []
            for i in range(0, len(x), EVAL_BATCH):
                logits = np.asarray(runners[name](self.model_input(x[i:i + EVAL_BATCH]).numpy()))
                out.append(logits.argmax(1))
                advance(len(out[-1]))
            preds[name] = np.concatenate(out)
        base = float((preds[baseline] == y).mean())
        return {name: {"top1": float((p == y).mean()), "top1_drop_pp": (base - float((p == y).mean())) * 100.0,
                       "agreement": float((p == preds[baseline]).mean())} for name, p in preds.items()}

    def check_outputs(self, model: nn.Module) -> None:
        """Refuse a model whose logits do not match the task's classes."""
        with torch.inference_mode():
            out = model.eval()(self.example_input().to(next(model.parameters()).device))
        if out.dim() != 2 or out.shape[1] != self.num_classes:
            raise ConfigError(
                f"the model outputs shape {list(out.shape)} but task {self.name!r} has {self.num_classes} classes; "
                "add a `train` stage (its head: auto gives the model a new classifier for these classes) under "
                "`prepare:`, or give a model with that many outputs"
            )

    def info(self) -> dict[str, Any]:
        return {"name": self.data.name, "kind": self.kind, "train_size": len(self.data.train_y),
                "test_size": len(self.data.test_y), "classes": list(self.data.label_names),
                "input": {"size": list(self.transform.size) if self.transform.size else None,
                          "channels": self.transform.channels, "normalize": self.transform.normalize}}
