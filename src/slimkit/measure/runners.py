"""A variant as a callable on numpy arrays, whatever runs it underneath."""

from __future__ import annotations

import numpy as np
import torch

from slimkit.deploy.onnx_model import OnnxModel
from slimkit.measure.workload import Runner
from slimkit.zoo.models import LoadedModel


def make_runner(model: LoadedModel | OnnxModel, threads: int, device: str = "cpu",
                example: tuple[torch.Tensor, ...] | None = None) -> Runner:
    """A function of the model's inputs as numpy arrays, in order, returning its output.

    A text encoder takes ``(input_ids, attention_mask, token_type_ids)`` and returns
    embeddings; an image model takes ``(images,)`` and returns logits. A PyTorch model
    that an ``arena`` stage marked is served from its activation arena, planned on
    ``example`` (the model's positional inputs).
    """
    if isinstance(model, OnnxModel):
        from slimkit.deploy.ort_runtime import OrtEncoder, OrtRunner

        cls = OrtEncoder if model.tokenizer is not None else OrtRunner
        return cls(str(model.path), threads=threads, device=device)
    torch.set_num_threads(threads)
    module = model.module.to(device).eval()
    from slimkit.memory.stages import arena_config

    arena = arena_config(module)
    if arena is not None:
        return _arena_runner(module, arena, example, device)

    def run(*inputs: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = module(*(torch.from_numpy(x).to(device) for x in inputs))
        return out.float().cpu().numpy()

    return run


def _arena_runner(module, config, example, device: str) -> Runner:
    from slimkit.errors import ConfigError
    from slimkit.memory.arena import build_arena

    if not example:
        raise ConfigError("an arena stage plans the activations of the inputs it serves; give example inputs")
    executor = build_arena(module, [x.to(device) for x in example], config)
    largest = max(config.batch_buckets)

    def run(*inputs: np.ndarray) -> np.ndarray:
        tensors = [torch.from_numpy(x).to(device) for x in inputs]
        # Larger requests are served in chunks of the largest planned batch, as a server would.
        parts = [executor(*(t[i:i + largest] for t in tensors)) for i in range(0, len(tensors[0]), largest)]
        return torch.cat([p.float() for p in parts]).cpu().numpy()

    return run
