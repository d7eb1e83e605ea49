"""Supervised training: ``train_(model, config, data)``, fine-tuning on hard labels (with an
optional teacher) through the same loop as distillation, and the classifier head a
pretrained model is given for a new task."""

from slimkit.train.api import train_
from slimkit.train.config import TrainConfig
from slimkit.train.head import HeadConfig, classifier_layer, replace_head_

__all__ = ["train_", "TrainConfig", "HeadConfig", "classifier_layer", "replace_head_"]
