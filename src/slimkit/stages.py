"""Every built-in stage method, and looking one up by name.

Importing this module registers each built-in method (importing a method module runs its
``@register``); the lookups below then see all of them. The modules are listed
explicitly, not discovered, so what a recipe may name is plain to see. Only code that
turns names into configs (recipes, loading a saved model) needs this module; a technique
registers itself and never imports it, so techniques sit below it with no cycle.
"""

from __future__ import annotations

import slimkit.compress.cluster  # noqa: F401
import slimkit.deploy.export  # noqa: F401
import slimkit.distill.stage  # noqa: F401
import slimkit.memory.stages  # noqa: F401
import slimkit.prune.cnn  # noqa: F401
import slimkit.prune.magnitude  # noqa: F401
import slimkit.prune.transformer  # noqa: F401
import slimkit.quantize.convert  # noqa: F401
import slimkit.quantize.dynamic  # noqa: F401
import slimkit.quantize.lowp  # noqa: F401
import slimkit.quantize.ort  # noqa: F401
import slimkit.quantize.ort_fp16  # noqa: F401
import slimkit.quantize.pt2e  # noqa: F401
import slimkit.quantize.qat  # noqa: F401
import slimkit.quantize.static_int8  # noqa: F401
import slimkit.quantize.weight_only  # noqa: F401
import slimkit.train.head  # noqa: F401
import slimkit.train.stage  # noqa: F401
from slimkit.registry import config_class, config_from_dict, handler_for, kinds, methods

__all__ = ["config_class", "config_from_dict", "handler_for", "kinds", "methods"]
