"""Running a training step to measure it: the loss of a batch, the model's device, its
tensors, and gradients and RNG streams put back afterwards."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from slimkit.batches import call_with
from slimkit.errors import SlimkitError

Batch = Any  # a Tensor, a tuple of positional inputs, or a dict of keyword inputs
LossFn = Callable[[Any], torch.Tensor]



def _loss(model: nn.Module, batch: Batch, loss_fn: LossFn) -> torch.Tensor:
    loss = loss_fn(call_with(model, batch))
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
        got = f"a tensor of shape {list(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise SlimkitError(f"loss_fn must return a scalar tensor that depends on the model's parameters; got {got}"
                           + (" that needs no grad" if isinstance(loss, torch.Tensor) and loss.numel() == 1 else ""))
    return loss.float()


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _flat_tensors(obj: Any) -> list[torch.Tensor]:
    from torch.utils._pytree import tree_flatten

    if hasattr(obj, "to_tuple") and not isinstance(obj, torch.Tensor):  # HF ModelOutput
        obj = obj.to_tuple()
    return [t for t in tree_flatten(obj)[0] if isinstance(t, torch.Tensor) and t.layout == torch.strided]


def _zero_grads(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


@contextmanager
def _preserved(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Steps run inside leave the model's gradients and the RNG streams as they were."""
    grads = [(p, p.grad) for p in model.parameters()]
    devices = [device] if device.type == "cuda" else []
    for p, _ in grads:  # else backward would add into the caller's gradients in place
        p.grad = None
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        for p, g in grads:
            p.grad = g
