"""The forwards checkpointing installs on blocks and on the model, and their removal: a
checkpointed block's forward (full or selective recompute, batch-norm running statistics
updated once), the bf16 autocast forward, and wrapping and unwrapping a model."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts
from torch.utils.checkpoint import checkpoint as _torch_checkpoint

from slimkit.errors import LayerSelectionError
from slimkit.memory.checkpoint.steps import _device


class _CheckpointedForward:
    """A block's instance ``forward``: under autograd, run it inside a checkpoint.

    A callable object rather than a closure, so that ``copy.deepcopy`` of the model
    points the copy's forward at the copied block.
    """

    def __init__(self, module: nn.Module, previous: Callable[..., Any] | None, policy: str = "full"):
        self.module = module
        self.previous = previous
        self.policy = policy

    def _forward(self) -> Callable[..., Any]:
        return self.previous or type(self.module).forward.__get__(self.module)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        fn = self._forward()
        if not torch.is_grad_enabled():  # inference: nothing is saved, nothing to recompute
            return fn(*args, **kwargs)
        fn = _running_stats_once(fn, self.module)
        # Non-reentrant: works with keyword arguments, with inputs that need no grad, and
        # with torch.autograd.grad; the RNG state is restored so dropout masks repeat.
        if self.policy == "selective":
            return _torch_checkpoint(fn, *args, use_reentrant=False, context_fn=_selective_contexts, **kwargs)
        return _torch_checkpoint(fn, *args, use_reentrant=False, **kwargs)


def _running_stats_once(fn: Callable[..., Any], block: nn.Module) -> Callable[..., Any]:
    """``fn`` whose second and later calls leave the block's batch-norm statistics as they were.

    The recompute in the backward runs a training-mode forward again: batch norms would
    update their running statistics twice per step, and a checkpointed CNN would end with
    other statistics than the same training without checkpointing.
    """
    norms = [m for m in block.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return fn
    calls = [0]

    def run(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == 1:
            return fn(*args, **kwargs)
        saved = [(m, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in norms]
        try:
            return fn(*args, **kwargs)
        finally:
            with torch.no_grad():
                for m, mean, var, count in saved:
                    m.running_mean.copy_(mean)
                    m.running_var.copy_(var)
                    m.num_batches_tracked.copy_(count)

    return run


_MATMULS = {torch.ops.aten.mm.default: 0, torch.ops.aten.bmm.default: 0,
            torch.ops.aten.addmm.default: 1, torch.ops.aten.baddbmm.default: 1}  # where the two factors start


def _keep_wide_contractions(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """Keep the outputs of matmuls whose contracted dimension is at least twice their
    output's: they cost the most arithmetic per byte kept."""
    start = _MATMULS.get(op)
    if start is not None:
        a, b = args[start], args[start + 1]
        if a.shape[-1] >= 2 * b.shape[-1]:
            return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts() -> tuple[Any, Any]:
    return create_selective_checkpoint_contexts(_keep_wide_contractions)


class _AutocastForward:
    """The model's instance ``forward``: run it under bf16 autocast on its device type."""

    def __init__(self, module: nn.Module, previous: Callable[..., Any] | None):
        self.module = module
        self.previous = previous

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        fn = self.previous or type(self.module).forward.__get__(self.module)
        with torch.autocast(_device(self.module).type, dtype=torch.bfloat16):
            return fn(*args, **kwargs)


def _wrap(model: nn.Module, names: Sequence[str], autocast: str, policy: str = "full") -> None:
    modules = []
    for name in names:
        if not name:
            raise LayerSelectionError("the whole model cannot be a block; choose its submodules")
        try:
            modules.append(model.get_submodule(name))
        except AttributeError:
            raise LayerSelectionError(f"the model has no module {name!r} to checkpoint") from None
    for m in modules:
        m.forward = _CheckpointedForward(m, m.__dict__.get("forward"), policy)
    if autocast == "bf16":
        model.forward = _AutocastForward(model, model.__dict__.get("forward"))


def _unwrap(model: nn.Module) -> None:
    for m in model.modules():
        fwd = m.__dict__.get("forward")
        while isinstance(fwd, (_CheckpointedForward, _AutocastForward)):
            if fwd.previous is None:
                del m.forward
            else:
                m.forward = fwd.previous
            fwd = m.__dict__.get("forward")


@contextmanager
def _applied(model: nn.Module, names: Sequence[str], autocast: str) -> Iterator[None]:
    """Checkpoint ``names`` for the duration; whatever checkpoint_ did before comes back."""
    before = [(m, m.__dict__["forward"]) for m in model.modules() if "forward" in m.__dict__]
    _unwrap(model)
    _wrap(model, names, autocast)
    try:
        yield
    finally:
        _unwrap(model)
        for m, fwd in before:
            m.forward = fwd
