"""Running a model in eval mode for a while, then giving every module its own mode back."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode; on exit, even by an exception, give every submodule back
    its own train/eval mode.

    ``model.train(was_training)`` would not do: it sets every submodule to the top-level
    mode, so a batch norm frozen in eval mode inside a training model would come back
    training.
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode
