"""Knowledge distillation: ``slimkit.distill(teacher, student, data, config)``.

The package is itself the verb: calling it calls :func:`slimkit.distill.api.distill`,
while its configs and data types stay reachable as ``slimkit.distill.DistillConfig`` and
so on.
"""

import sys
import types

from slimkit.distill.api import distill
from slimkit.distill.config import DistillConfig, EarlyStopping, LossTerm
from slimkit.distill.trainer import DistillData, DistillResult, NonFiniteLoss

__all__ = ["distill", "DistillConfig", "EarlyStopping", "LossTerm", "DistillData", "DistillResult", "NonFiniteLoss"]


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs) -> DistillResult:
        return distill(*args, **kwargs)

    __call__.__doc__ = distill.__doc__


sys.modules[__name__].__class__ = _CallablePackage
