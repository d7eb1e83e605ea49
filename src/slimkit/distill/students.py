"""Building students: a shallower copy of a transformer, initialised from teacher layers."""

from __future__ import annotations

from torch import nn

from slimkit.errors import ConfigError
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
