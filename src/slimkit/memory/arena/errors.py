"""What can go wrong when planning an activation arena: :class:`TraceError` (the model
cannot be traced into a plannable graph) and :class:`ArenaFallbackWarning` (the model
runs eagerly instead)."""

from __future__ import annotations

from slimkit.errors import SlimkitError


class TraceError(SlimkitError):
    """The model cannot be traced into a graph the arena can plan; ``operator`` names the
    operator (or the line of model code) that stopped it."""

    def __init__(self, message: str, operator: str | None = None):
        super().__init__(message)
        self.operator = operator


class ArenaFallbackWarning(UserWarning):
    """An arena could not be planned (or a request fits no bucket): the model runs eagerly."""
