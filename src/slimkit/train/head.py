"""A new classifier head for a task: what transfer learning from a pretrained backbone starts with."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from slimkit.config import SlimConfig
from slimkit.errors import ConfigError
from slimkit.registry import register


class HeadConfig(SlimConfig):
    """Replace the classifier, the model's last ``nn.Linear``, by a new one with ``classes`` outputs.

    Recorded with the model by the ``train`` stage, so loading a saved model rebuilds the
    new head's shape before its weights are read.

    Attributes:
        classes: outputs of the new head.
        seed: seeds the new head's initialisation.
        layer: the head's qualified name; None takes the last ``nn.Linear``.
    """

    kind = "head"
    method = "replace"
    recipe_stage = False  # recorded by the train stage, not written in recipes
    classes: int = Field(ge=1)
    seed: int = 0
    layer: str | None = None


def classifier_layer(model: nn.Module) -> str:
    """Qualified name of the model's last ``nn.Linear`` (in definition order), its classifier."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ConfigError(
            f"{type(model).__name__} has no nn.Linear layer to use as its classifier; give a model whose "
            "last Linear layer is its head, or set head: keep"
        )
    return names[-1]


@register(HeadConfig)
def replace_head_(model: nn.Module, config: HeadConfig, **_) -> list[str]:
    """Give ``model`` a freshly initialised classifier with ``config.classes`` outputs, in place.

    Returns:
        The head's qualified name.
    """
    name = config.layer or classifier_layer(model)
    old = model.get_submodule(name)
    if not isinstance(old, nn.Linear):
        raise ConfigError(f"head layer {name!r} is a {type(old).__name__}, not an nn.Linear; name the classifier's Linear layer")
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    generator = torch.Generator().manual_seed(config.seed)
    new = nn.Linear(old.in_features, config.classes, bias=old.bias is not None)
    with torch.no_grad():
        # PyTorch's default Linear initialisation, drawn from a seeded generator.
        bound = 1.0 / old.in_features ** 0.5
        new.weight.uniform_(-bound, bound, generator=generator)
        if new.bias is not None:
            new.bias.uniform_(-bound, bound, generator=generator)
    p = old.weight
    setattr(parent, attr, new.to(device=p.device, dtype=p.dtype))
    return [name]
