"""A variant as a callable on numpy token arrays, whatever runs it underneath."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from slimkit.deploy.onnx_model import OnnxModel
from slimkit.zoo.models import LoadedModel

Runner = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def make_runner(model: LoadedModel | OnnxModel, threads: int, device: str = "cpu") -> Runner:
    """A function ``(input_ids, attention_mask, token_type_ids) -> embeddings``."""
    if isinstance(model, OnnxModel):
        from slimkit.deploy.ort_runtime import OrtEncoder

        return OrtEncoder(str(model.path), threads=threads, device=device)
    torch.set_num_threads(threads)
    module = model.module.to(device).eval()

    def run(input_ids, attention_mask, token_type_ids):
        with torch.inference_mode():
            out = module(
                torch.from_numpy(input_ids).to(device),
                torch.from_numpy(attention_mask).to(device),
                torch.from_numpy(token_type_ids).to(device),
            )
        return out.float().cpu().numpy()

    return run
