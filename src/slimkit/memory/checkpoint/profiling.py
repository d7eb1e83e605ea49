"""Measuring a model for checkpointing: :func:`profile_checkpointing` times the steps,
follows live storages through one step cut into phases at block boundaries, and measures
the least reachable peak."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from slimkit.memory.checkpoint.blocks import resolve_blocks
from slimkit.memory.checkpoint.config import CheckpointConfig
from slimkit.memory.checkpoint.cost_model import BlockProfile, CheckpointProfile, _Phase
from slimkit.memory.checkpoint.steps import Batch, LossFn, _device, _flat_tensors, _loss, _preserved
from slimkit.memory.checkpoint.timing import _time_steps
from slimkit.memory.checkpoint.wrap import _applied
from slimkit.memory.peak import LiveStorageCounter, measure_activation_peak, preallocated_grads


def profile_checkpointing(
    model: nn.Module,
    example_batch: Batch,
    loss_fn: LossFn,
    config: CheckpointConfig | None = None,
) -> CheckpointProfile:
    """Measure what checkpointing each block of ``model`` saves and costs.

    Runs ``config.repeats + 1`` timed steps, one step followed storage by storage, and
    one step with every block checkpointed. The model comes back as it was: its
    ``.grad`` tensors, the RNG state and its forward are restored.

    Args:
        model: the model, in the mode it will train in (dropout on or off).
        example_batch: one training batch as the model takes it: a tensor, a tuple of
            positional inputs or a dict of keyword inputs, on the model's device.
        loss_fn: maps the model's output to a scalar loss, e.g.
            ``lambda out: out.loss`` or ``lambda out: out.last_hidden_state.pow(2).mean()``.
        config: blocks, autocast and repeats (the budget is not used here).
    """
    config = config or CheckpointConfig()
    names = resolve_blocks(model, config.blocks)
    device = _device(model)
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        _loss(model, example_batch, loss_fn).backward()

    with _preserved(model, device):
        with _applied(model, [], config.autocast):
            order, fwd_seconds, step_seconds = _time_steps(model, names, step, config.repeats, device)
            blocks, phases, tracked_max = _trace(model, order, example_batch, loss_fn, fwd_seconds)
            # The traced step was followed by storage tracking already; the CUDA allocator
            # also sees workspaces and rounding, so on CUDA its peak is the one reported.
            none = measure_activation_peak(step, params, device) if device.type == "cuda" else None
        max_peak = none.peak_bytes if none is not None else tracked_max
        profile = CheckpointProfile(
            blocks=blocks, autocast=config.autocast, device=str(device), inputs=_shapes(example_batch),
            step_seconds=step_seconds, max_peak_bytes=max_peak, min_peak_bytes=0, min_blocks=[],
            measure_method=none.method if none is not None else "storages", phases=phases,
            offset_bytes=max_peak - tracked_max,
        )
        # Usually every block; but recomputing the last block can cost more than it saves.
        lowest = profile.lowest()
        with _applied(model, lowest, config.autocast):
            profile.min_peak_bytes = measure_activation_peak(step, params, device).peak_bytes
        profile.min_blocks = lowest
    return profile


def _trace(
    model: nn.Module, order: list[str], batch: Batch, loss_fn: LossFn, fwd_seconds: dict[str, float]
) -> tuple[list[BlockProfile], list[_Phase], int]:
    """Follow live storages through one step and cut it into phases at block boundaries."""
    index = {n: i for i, n in enumerate(order)}
    tracker = LiveStorageCounter()
    start_live: dict[int, int] = {}
    start_count: dict[int, int] = {}
    fwd_phase: dict[int, Any] = {}
    retained: dict[int, int] = {}
    out_bytes: dict[int, int] = {}
    inputs: dict[int, list[tuple[weakref.ref, int]]] = {}
    bwd_phase: dict[int, Any] = {}
    fired: set[tuple[str, int]] = set()

    def once(kind: str, i: int, fn: Callable[[], None]) -> Callable[[torch.Tensor], None]:
        def hook(_grad: torch.Tensor) -> None:
            if (kind, i) not in fired:
                fired.add((kind, i))
                fn()
        return hook

    def pre(i: int) -> Callable[..., None]:
        def hook(_m: nn.Module, args: Any, kwargs: Any) -> None:
            start_live[i] = tracker.live_bytes
            start_count[i] = tracker.counter
            fwd_phase[i] = tracker.mark(("forward", i))
            tensors = _flat_tensors((args, kwargs))
            seen: dict[int, tuple[weakref.ref, int]] = {}
            for t in tensors:
                st = t.untyped_storage()
                seen.setdefault(id(st), (weakref.ref(st), st.nbytes()))
            inputs[i] = list(seen.values())
            for t in tensors:
                if t.requires_grad:
                    # Its gradient is complete once the block's backward is done.
                    t.register_hook(once("after", i, lambda: tracker.mark(("after backward", i))))
        return hook

    def post(i: int) -> Callable[..., None]:
        def hook(_m: nn.Module, _a: Any, _kw: Any, output: Any) -> None:
            retained[i] = tracker.bytes_born_since(start_count[i])
            outs: dict[int, int] = {}
            for t in _flat_tensors(output):
                st = t.untyped_storage()
                if tracker.born_after(st, start_count[i]):
                    outs[id(st)] = st.nbytes()
            out_bytes[i] = sum(outs.values())
            tracker.mark(("between", i + 1))

            def begin_backward() -> None:
                bwd_phase[i] = tracker.mark(("backward", i))

            for t in _flat_tensors(output):
                if t.requires_grad:
                    t.register_hook(once("backward", i, begin_backward))
        return hook

    handles = []
    for n in order:
        m = model.get_submodule(n)
        handles += [m.register_forward_pre_hook(pre(index[n]), with_kwargs=True),
                    m.register_forward_hook(post(index[n]), with_kwargs=True)]
    params = [p for p in model.parameters() if p.requires_grad]
    freed_inputs: dict[int, int] = {}
    try:
        with _preserved(model, _device(model)), preallocated_grads(params), tracker:
            tracker.mark(("before", 0))
            loss = _loss(model, batch, loss_fn)
            # Inputs the baseline frees before the backward would be kept by a checkpoint.
            for i, refs in inputs.items():
                freed_inputs[i] = sum(b for ref, b in refs if ref() is None)
            loss.backward()
            del loss
    finally:
        for h in handles:
            h.remove()

    n = len(order)
    blocks = []
    for i, name in enumerate(order):
        boundary = freed_inputs.get(i, 0)
        saved = retained[i] - out_bytes[i]
        saving = saved - boundary
        fwd_peak_excess = fwd_phase[i].peak_bytes - start_live[i]
        bwd = bwd_phase.get(i)
        bwd_excess = bwd.peak_bytes - bwd.start_bytes if bwd is not None else 0
        # When checkpointed, its backward holds the kept inputs on top of what it held
        # before, and its recompute may go higher than the backward itself did.
        extra = max(boundary, fwd_peak_excess - saving - bwd_excess)
        blocks.append(BlockProfile(name, saved, out_bytes[i], boundary, saving, extra, fwd_seconds[name]))
    phases = []
    for ph in tracker.phases:
        kind, i = ph.label
        before = {"before": 0, "forward": i, "between": i, "backward": i, "after backward": i}[kind]
        where = {"before": "the step before the first block",
                 "forward": f"the forward of {order[min(i, n - 1)]}",
                 "between": f"the step after {order[i - 1]}" if i < n else "the step after the last block "
                            "(head, loss and their backward)",
                 "backward": f"the backward of {order[min(i, n - 1)]}",
                 "after backward": f"the backward after {order[min(i, n - 1)]}"}[kind]
        phases.append(_Phase(ph.peak_bytes, min(before, n), i if kind == "backward" else -1, kind, where))
    return blocks, phases, tracker.peak_bytes


def _shapes(batch: Batch) -> dict[str, list[int]]:
    if isinstance(batch, torch.Tensor):
        return {"input": list(batch.shape)}
    items = batch.items() if isinstance(batch, Mapping) else enumerate(batch)
    return {str(k): list(v.shape) for k, v in items if isinstance(v, torch.Tensor)}
