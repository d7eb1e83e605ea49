"""Building students: a shallower copy of a transformer, a narrower copy of a CNN.

Both start from the teacher's own weights (chosen layers, or the most important
channels), so distillation starts close to the teacher instead of from scratch.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable

import torch
from torch import nn

from slimkit.errors import ConfigError
from slimkit.prune import channel_groups, channel_importance, shrink_
from slimkit.prune.cnn import top_channels
from slimkit.prune.importance import WEIGHT_METHODS
from slimkit.zoo.models import LoadedModel


def shallow_transformer(teacher: LoadedModel, layers: list[int]) -> LoadedModel:
    """A copy of a Hugging Face encoder that keeps only the encoder layers ``layers``.

    Every other layer (``[0, 2, 4]`` of six) is how DistilBERT initialised its student:
    the student starts close to the teacher and distillation closes the gap. Embeddings
    and the pooling are copied as they are.

    Raises:
        ConfigError: an index is outside the teacher's layers, repeated, or none is given.
    """
    encoder = getattr(getattr(teacher.module, "backbone", None), "encoder", None)
    if encoder is None or not hasattr(encoder, "layer"):
        raise ConfigError("shallow_transformer needs a Hugging Face encoder (model.module.backbone.encoder.layer)")
    n = len(encoder.layer)
    if not layers or len(set(layers)) != len(layers) or any(not 0 <= i < n for i in layers):
        raise ConfigError(f"student layers {layers}: give distinct indices between 0 and {n - 1} (the teacher has {n} layers)")
    student = teacher.clone()
    backbone = student.module.backbone
    backbone.encoder.layer = nn.ModuleList([backbone.encoder.layer[i] for i in layers])
    for new_index, layer in enumerate(backbone.encoder.layer):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):  # attention caches are indexed by position
                module.layer_idx = new_index
    backbone.config.num_hidden_layers = len(layers)
    student.spec = {**student.spec, "hf_config": {**student.spec["hf_config"], "num_hidden_layers": len(layers)},
                    "initialised_from_layers": list(layers)}
    return student


def narrow_cnn(
    teacher: nn.Module,
    width: float,
    example_input: torch.Tensor | tuple,
    importance: str = "l1",
    exclude: Iterable[str] | None = None,
) -> nn.Module:
    """A copy of ``teacher`` with every prunable channel group cut to ``width`` of its channels.

    Each group (see :func:`slimkit.prune.channel_groups`) keeps ``floor(width * size + 0.5)``
    channels, at least one: the ones whose producing filters have the largest importance.
    The network's input channels and its output classes are never cut, nor are groups
    the analysis cannot prune safely (grouped convolutions, unknown operations, excluded
    modules). The teacher is untouched.

    Args:
        teacher: a CNN (or any model ``torch.fx`` can trace).
        width: the fraction of channels to keep, in ``(0, 1]``.
        example_input: an input the teacher accepts, for tracing.
        importance: how channels are ranked; ``l1`` (see
            :func:`slimkit.prune.channel_importance`).
        exclude: module names (or ``re:`` regexes) kept whole and not traced into.

    Returns:
        The student, a dense ``nn.Module`` in the teacher's train/eval mode.

    Raises:
        ConfigError: ``width`` outside ``(0, 1]`` or an unknown ``importance``.
        UntraceableModel: torch.fx cannot trace the teacher (the message names the module
            to exclude).
    """
    problems = []
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not 0 < width <= 1:
        problems.append(f"width: {width!r} must be a fraction of the teacher's channels in (0, 1]")
    if importance not in WEIGHT_METHODS:
        problems.append(f"importance: {importance!r} is not known; choose one of {', '.join(WEIGHT_METHODS)}")
    if problems:
        raise ConfigError(problems)
    student = copy.deepcopy(teacher)
    keep = {}
    for group in channel_groups(student, example_input, exclude or ()):
        # Its own count rather than kept_channels(): a student is sized by the width it
        # keeps, rounded to nearest, where pruning floors the fraction it removes. Halves
        # round up, so width 0.5 of 3 channels keeps 2 (Python's round() would round 2.5
        # down to 2 but 1.5 up to 2).
        n = max(1, math.floor(width * group.size + 0.5))
        if group.prunable and n < group.size:
            keep[group] = top_channels(channel_importance(student, group, importance), n)
    shrink_(student, keep)
    return student
