"""Models and tasks that ship offline, and loaders for a user's own."""

from slimkit.zoo.models import LoadedModel, TextEncoder, load_model
from slimkit.zoo.tasks import TextClassificationData, load_task

__all__ = ["LoadedModel", "TextEncoder", "load_model", "TextClassificationData", "load_task"]
