"""Knowledge distillation: ``distill(teacher, student, data, config)``."""

from slimkit.distill.api import distill
from slimkit.distill.config import DistillConfig, EarlyStopping, LossTerm
from slimkit.distill.trainer import DistillData, DistillResult, NonFiniteLoss

__all__ = ["distill", "DistillConfig", "EarlyStopping", "LossTerm", "DistillData", "DistillResult", "NonFiniteLoss"]
