"""Timing a training step and the forward of each block (medians over repeats), and the
block execution order."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from slimkit.errors import ConfigError
from slimkit.memory.checkpoint.steps import _zero_grads


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_steps(
    model: nn.Module, names: list[str], step: Callable[[], None], repeats: int, device: torch.device
) -> tuple[list[str], dict[str, float], float]:
    """Block execution order, each block's median forward time, and the median step time."""
    order: list[str] = []
    starts: dict[str, float] = {}
    runs: dict[str, list[float]] = {n: [] for n in names}
    calls: dict[str, int] = dict.fromkeys(names, 0)
    recording = [False]

    def pre(name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, _a: Any) -> None:
            if not recording[0]:
                return
            if name not in order:
                order.append(name)
            calls[name] += 1
            _sync(device)
            starts[name] = time.perf_counter()
        return hook

    def post(name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, _a: Any, _o: Any) -> None:
            if recording[0]:
                _sync(device)
                runs[name].append(time.perf_counter() - starts[name])
        return hook

    handles = []
    for n in names:
        m = model.get_submodule(n)
        handles += [m.register_forward_pre_hook(pre(n)), m.register_forward_hook(post(n))]
    try:
        step()  # warm-up: first calls allocate caches and pick kernels
        _zero_grads(model)
        step_times = []
        recording[0] = True
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            step()
            _sync(device)
            step_times.append(time.perf_counter() - t0)
            _zero_grads(model)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if calls[n] == 0]
    if missing:
        raise ConfigError(f"blocks: {missing} did not run in the example step; choose modules the forward calls")
    repeated = [n for n in names if calls[n] != repeats]
    if repeated:
        counts = ", ".join(f"{n} {calls[n]} times" for n in repeated)
        raise ConfigError(f"blocks: {repeated} do not run exactly once per step ({counts} in {repeats} steps: "
                          "shared weights, or a condition?); the planner needs "
                          "blocks that run once: choose the modules that call them, or checkpoint_ without a budget")
    return order, {n: statistics.median(runs[n]) for n in names}, statistics.median(step_times)
