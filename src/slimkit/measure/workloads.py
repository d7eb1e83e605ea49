"""Which workload a recipe's task needs: text for a tokenizer's model, images otherwise."""

from __future__ import annotations

from typing import Any

from slimkit.errors import ConfigError
from slimkit.measure.image_workload import ImageWorkload, is_image_task
from slimkit.measure.text_workload import TextWorkload
from slimkit.measure.workload import Workload


def workload_for(task: Any, model: Any, seq_len: int = 128) -> Workload:
    """The workload of a recipe's ``task`` for ``model``.

    An image task (``fashion-mnist``, an image folder, a CSV of image paths) needs a model
    without a tokenizer; a text task needs one with a tokenizer.
    """
    if is_image_task(task):
        if model.tokenizer is not None:
            raise ConfigError(
                f"task.source: {task.source!r} is an image task, but the model is a text encoder with a "
                "tokenizer; give an image model (mobilenet-v2, a saved slimkit folder or 'package.module:function')"
            )
        return ImageWorkload.from_spec(task, model)
    if model.tokenizer is None:
        raise ConfigError(
            f"task.source: {task.source!r} is a text task, but the model has no tokenizer; give a Hugging "
            "Face model directory with its tokenizer files, or an image task (fashion-mnist, an image "
            "folder, or a CSV with task.image_column) for an image model"
        )
    return TextWorkload.from_spec(task, model, seq_len)
