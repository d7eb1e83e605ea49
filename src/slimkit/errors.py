"""Exceptions a user of slimkit can meet, each naming the bad value and the fix."""

from __future__ import annotations


class SlimkitError(Exception):
    """Base class of every error slimkit raises for bad input."""


class ConfigError(SlimkitError):
    """A recipe or config is invalid; ``problems`` lists every mistake found at once."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) found:\n{lines}")


class ModelLoadError(SlimkitError):
    """A model file or directory is missing, corrupt or of an unknown kind."""


class DataError(SlimkitError):
    """A dataset is missing, empty, degenerate or contains invalid values."""


class LayerSelectionError(SlimkitError):
    """A layer pattern matched nothing, or named a layer that does not exist."""
