"""The model every slimkit function passes around: a module and how to rebuild it."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from torch import nn


@dataclass
class LoadedModel:
    """A model with what is needed to feed it and to rebuild it.

    Attributes:
        module: the ``nn.Module`` (a :class:`TextEncoder` for text models).
        spec: JSON description of the architecture (see :func:`build_from_spec`).
        tokenizer: a Hugging Face tokenizer for text models, else None.
        max_seq_len: the longest sequence the model accepts.
        example_inputs: inputs for tracing and export.
    """

    module: nn.Module
    spec: dict[str, Any]
    tokenizer: Any = None
    max_seq_len: int | None = None
    example_inputs: tuple = field(default_factory=tuple)

    def clone(self) -> LoadedModel:
        return LoadedModel(
            copy.deepcopy(self.module), dict(self.spec), self.tokenizer, self.max_seq_len,
            self.example_inputs,
        )
