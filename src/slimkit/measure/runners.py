"""A variant as a callable on numpy arrays, whatever runs it underneath."""

from __future__ import annotations

import numpy as np
import torch

from slimkit.deploy.onnx_model import OnnxModel
from slimkit.measure.workload import Runner
from slimkit.zoo.models import LoadedModel


def make_runner(model: LoadedModel | OnnxModel, threads: int, device: str = "cpu") -> Runner:
    """A function of the model's inputs as numpy arrays, in order, returning its output.

    A text encoder takes ``(input_ids, attention_mask, token_type_ids)`` and returns
    embeddings; an image model takes ``(images,)`` and returns logits.
    """
    if isinstance(model, OnnxModel):
        from slimkit.deploy.ort_runtime import OrtEncoder, OrtRunner

        cls = OrtEncoder if model.tokenizer is not None else OrtRunner
        return cls(str(model.path), threads=threads, device=device)
    torch.set_num_threads(threads)
    module = model.module.to(device).eval()

    def run(*inputs: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = module(*(torch.from_numpy(x).to(device) for x in inputs))
        return out.float().cpu().numpy()

    return run
