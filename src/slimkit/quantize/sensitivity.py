"""Per-layer sensitivity: how much the output moves when only one layer is quantized.

Used to keep the few layers that hurt fidelity most in floating point (a per-layer
fallback chosen by measurement rather than by name). Calibration inputs must come from
the train split.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from slimkit.errors import DataError
from slimkit.layers import set_module
from slimkit.quantize.dynamic_linear import DynamicInt8Linear


def linear_sensitivity(
    module: nn.Module, names: list[str], calibration: list[dict[str, np.ndarray]], per_channel: bool = True, samples: int = 32
) -> dict[str, float]:
    """Mean cosine distance (1 - cosine) of the output to fp32 with only ``name`` in dynamic int8.

    Args:
        module: the fp32 model; it is left unchanged.
        names: qualified names of the ``nn.Linear`` layers to score.
        calibration: input dicts (keyword arguments of ``module``) from the train split.
        per_channel: weight granularity to score with.
        samples: how many calibration inputs to use.
    """
    if not calibration:
        raise DataError("sensitivity needs calibration inputs from the train split; none were given")
    feeds = [{k: torch.from_numpy(np.asarray(v)) for k, v in f.items()} for f in calibration[:samples]]
    with torch.inference_mode():
        ref = [module(**f).float() for f in feeds]
        scores = {}
        for name in names:
            original = module.get_submodule(name)
            set_module(module, name, DynamicInt8Linear.from_linear(original, per_channel))
            try:
                cos = [torch.nn.functional.cosine_similarity(module(**f).float(), r, dim=-1).mean() for f, r in zip(feeds, ref, strict=True)]
            finally:
                set_module(module, name, original)
            scores[name] = float(1.0 - torch.stack(cos).mean())
    return scores


def most_sensitive(scores: dict[str, float], k: int) -> list[str]:
    """The ``k`` layer names with the largest scores, most sensitive first."""
    return sorted(scores, key=scores.get, reverse=True)[:k]
