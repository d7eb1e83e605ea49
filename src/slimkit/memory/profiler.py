"""Where the memory of a forward pass or a training step goes: the live-tensor timeline,
split into parameters, gradients, optimizer state and activations, with the peak, the
operator and module where it happens, and the largest tensors alive at that moment.

Every tensor storage is followed from the operator that makes it to the moment it is freed
(:mod:`slimkit.memory.storage_tracker`), on CPU and on CUDA alike; on CUDA the caching
allocator's own statistics are recorded beside it (:mod:`slimkit.memory.cuda_allocator`).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import itertools
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from slimkit.batches import to_device
from slimkit.errors import SlimkitError
from slimkit.memory.cuda_allocator import AllocatorWatch
from slimkit.memory.storage_tracker import StorageTracker, tensors_in
from slimkit.memory.timeline import MemoryProfile, build_profile

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


def default_loss(output: Any) -> torch.Tensor:
    """The sum of the means of every floating-point output that requires grad.

    Any output works for measuring memory: what matters is that backward reaches every
    parameter the output depends on. The means are taken in fp32, as a real loss would be.
    """
    parts = [t.float().mean() for t in tensors_in(output) if t.is_floating_point() and t.requires_grad]
    if not parts:
        raise SlimkitError(
            "the model's output has no floating-point tensor that requires grad, so a training "
            "step has nothing to differentiate; give loss_fn=..., or check that some "
            "parameters have requires_grad=True"
        )
    return parts[0] if len(parts) == 1 else torch.stack(parts).sum()


def adamw(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """The default optimizer of a profiled training step: AdamW with PyTorch's defaults."""
    return torch.optim.AdamW(params)


def profile(
    model: nn.Module,
    inputs: Any,
    *,
    train: bool = False,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    optimizer: torch.optim.Optimizer | OptimizerFactory | None = None,
    top_k: int = 10,
    snapshot: str | os.PathLike | None = None,
) -> MemoryProfile:
    """Profile the live-tensor memory of one forward pass or one training step.

    With ``train=False`` the model runs once in eval mode under ``torch.no_grad()``, as it
    serves. With ``train=True`` it runs one training step in train mode: forward, loss,
    backward and ``optimizer.step()``, starting with no gradients (as after
    ``zero_grad(set_to_none=True)``).

    The step runs on ``model`` itself, not a copy, so the profile sees the real tensors.
    Afterwards the model is as it was: parameters and buffers are copied back from a CPU
    copy taken before the step, ``.grad`` and train/eval flags are restored, a given
    optimizer gets its state back, and the global RNG state is untouched. That copy costs
    host memory the size of the weights (training only).

    Args:
        model: the model, on the device to profile (CPU or CUDA).
        inputs: one tensor, a tuple of positional arguments, or a dict of keyword
            arguments. Tensors are moved to the model's device first.
        train: profile a whole training step instead of a forward pass.
        loss_fn: ``loss_fn(output) -> scalar tensor``; default :func:`default_loss`.
        optimizer: an optimizer over the model's parameters, or a function that builds
            one from the list of trainable parameters; default AdamW (:func:`adamw`).
        top_k: how many of the largest tensors alive at the peak to list.
        snapshot: on CUDA, also write the allocator's snapshot (every allocation with its
            stack trace) to this path, for PyTorch's memory viewer. Ignored elsewhere.

    Returns:
        The :class:`~slimkit.memory.timeline.MemoryProfile`: the timeline (one event per
        operator), the peak with its operator, module and largest live tensors, and the
        activation memory per module.

    Raises:
        SlimkitError: for a training step when no parameter requires grad, or when the
            loss is not a scalar tensor that requires grad.
    """
    if top_k < 0:
        raise SlimkitError(f"top_k is {top_k}; give a count of tensors to list, 0 or more")
    device = _device_of(model)
    args, kwargs = _call_args(inputs, device)
    names = {id(p): n for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    if train and not trainable:
        raise SlimkitError(
            "train=True, but no parameter of the model requires grad; unfreeze the layers to "
            "train (p.requires_grad_(True)) or profile a forward pass with train=False"
        )
    given_optimizer = isinstance(optimizer, torch.optim.Optimizer)
    opt = None
    if train:
        opt = optimizer if given_optimizer else (optimizer or adamw)(trainable)

    with _restored(model, opt if given_optimizer else None, save_weights=train):
        tracker = StorageTracker(model)
        for name, p in model.named_parameters():
            tracker.register(p, "parameters", name, name.rpartition(".")[0])
        for name, b in model.named_buffers():
            tracker.register(b, "buffers", name, name.rpartition(".")[0])
        for name, t in _named_inputs(args, kwargs):
            tracker.register(t, "inputs", name)
        if opt is not None:
            for name, t in _optimizer_tensors(opt, names):
                tracker.register(t, "optimizer_state", name)

        watch = AllocatorWatch(device, snapshot)
        gc_was_enabled = gc.isenabled()
        # Collect now and not during the step: a tensor is freed when its last reference
        # goes, at a reproducible point, never when the cycle collector happens to run.
        StorageTracker.warm_up()
        gc.collect()
        gc.disable()
        try:
            with _fork_rng(device), watch, tracker.watching(tag_backward=train):
                tracker.mark("<start>")
                if train:
                    assert opt is not None
                    _train_step(model, args, kwargs, loss_fn or default_loss, opt, tracker)
                else:
                    _forward(model, args, kwargs, tracker)
                tracker.phase = "end"
                tracker.mark("<end>")
            for p in trainable:
                if p.grad is not None:
                    tracker.set_kind(p.grad, "gradients", f"{names.get(id(p), '?')}.grad")
            if opt is not None:
                for name, t in _optimizer_tensors(opt, names):
                    tracker.set_kind(t, "optimizer_state", name)
        finally:
            tracker.close()
            if gc_was_enabled:
                gc.enable()
    return build_profile(tracker.records, tracker.events, device=str(device), train=train,
                         top_k=top_k, allocator=watch.stats)


def _forward(model: nn.Module, args: tuple, kwargs: dict, tracker: StorageTracker) -> None:
    model.eval()
    tracker.phase = "forward"
    with torch.no_grad():
        model(*args, **kwargs)  # the output is dropped on return, as a served request's is


def _train_step(model: nn.Module, args: tuple, kwargs: dict, loss_fn: Callable[[Any], torch.Tensor],
                opt: torch.optim.Optimizer, tracker: StorageTracker) -> None:
    model.train()
    tracker.phase = "forward"
    output = model(*args, **kwargs)
    tracker.phase = "loss"
    loss = loss_fn(output)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise SlimkitError(
            f"loss_fn returned {type(loss).__name__}"
            f"{'' if not isinstance(loss, torch.Tensor) else f' of shape {tuple(loss.shape)}'}; "
            "it must return a scalar tensor (reduce it with .mean() or .sum())"
        )
    if not loss.requires_grad:
        raise SlimkitError("the loss does not require grad; compute it from the model's output "
                           "without .detach() or torch.no_grad()")
    tracker.phase = "backward"
    loss.backward()
    tracker.phase = "optimizer"
    opt.step()
    # The output and the loss go out of scope here, as they would at the end of a loop body.


@contextlib.contextmanager
def _restored(model: nn.Module, opt: torch.optim.Optimizer | None, save_weights: bool) -> Iterator[None]:
    """Give the model (and a caller's optimizer) back as they were, whatever the step did."""
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.grad) for p in model.parameters()]
    weights = []
    if save_weights:
        seen: set[int] = set()
        for t in itertools.chain(model.parameters(), model.buffers()):
            if id(t) not in seen:
                seen.add(id(t))
                weights.append((t, t.detach().to("cpu", copy=True)))
    opt_state = _cpu_copy(opt.state_dict()) if opt is not None else None
    for p, _ in grads:
        p.grad = None  # the step starts as after zero_grad(set_to_none=True)
    try:
        yield
    finally:
        with torch.no_grad():
            for t, saved in weights:
                t.copy_(saved)
        for p, g in grads:
            p.grad = g
        for m, flag in modes:
            m.training = flag
        if opt is not None:
            opt.load_state_dict(opt_state)


def _cpu_copy(obj: Any) -> Any:
    """A deep copy whose tensors live on the CPU, so a saved state costs no device memory."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_copy(v) for v in obj)
    return copy.deepcopy(obj)


@contextlib.contextmanager
def _fork_rng(device: torch.device) -> Iterator[None]:
    """Dropout in the step draws random numbers; the caller's RNG stream is left as it was."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


def _device_of(model: nn.Module) -> torch.device:
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return torch.device("cpu")


def _call_args(inputs: Any, device: torch.device) -> tuple[tuple, dict]:
    if isinstance(inputs, Mapping):
        args, kwargs = (), dict(inputs)
    elif isinstance(inputs, (tuple, list)):
        args, kwargs = tuple(inputs), {}
    else:
        args, kwargs = (inputs,), {}
    return to_device(args, device), to_device(kwargs, device)


def _named_inputs(args: tuple, kwargs: dict) -> list[tuple[str, torch.Tensor]]:
    named = [(f"input[{i}]", t) for i, a in enumerate(args) for t in tensors_in(a)]
    return named + [(k, t) for k, v in kwargs.items() for t in tensors_in(v)]


def _optimizer_tensors(opt: torch.optim.Optimizer, names: dict[int, str]) -> list[tuple[str, torch.Tensor]]:
    out = []
    for p, state in opt.state.items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                out.append((f"{names.get(id(p), '?')}.{key}", value))
    return out
