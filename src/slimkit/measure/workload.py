"""What the harness feeds a model and how it scores it: a text task or an image task.

The runner is the same for every model; a :class:`Workload` holds what differs between a
text encoder with a tokenizer and an image classifier: the inputs that are timed, the
calibration examples, the data training stages learn from, and the task metric. Every
example that something learns from comes from the train split; the metric is computed on
the whole fixed test split.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch

# A variant as the harness calls it: positional numpy inputs, in the order of the feed.
Runner = Callable[..., np.ndarray]
Progress = Callable[[int], None]


class Workload(Protocol):
    """The task side of a run; :func:`slimkit.measure.workloads.workload_for` builds the right one."""

    kind: str  # "text" or "image"
    name: str

    def timing_feed(self, batch: int) -> dict[str, np.ndarray]:
        """Inputs of ``batch`` test examples, keyed by the exported model's input names,
        in the order the model takes them."""

    def serve_feed(self) -> dict[str, np.ndarray]:
        """One example, for the peak memory of a fresh serving process."""

    def calibration(self, n: int, framework: str) -> list[Any]:
        """``n`` single train examples: dicts by input name for ONNX models (and text
        models, which take keyword inputs), positional tuples for PyTorch image models."""

    def torch_inputs(self, feed: dict[str, np.ndarray], device: str) -> dict[str, torch.Tensor] | tuple:
        """``feed`` as the PyTorch model is called with it."""

    def count_inputs(self, feed: dict[str, np.ndarray]) -> tuple:
        """One example of ``feed`` for counting multiply-accumulates."""

    def accuracy(self, runners: dict[str, Runner], baseline: str, progress: Callable[[str, int], Progress]) -> dict[str, dict]:
        """The task metric of every variant, and how far each is from ``baseline``'s."""

    def info(self) -> dict[str, Any]:
        """Name and split sizes, for ``metrics.json``."""
