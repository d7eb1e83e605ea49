"""The last line of defence: shrinking, then checking every shape against the analysis.

The analysis predicts the shape of every traced tensor after shrinking: unchanged, except
along its channel axis, which loses the removed channels of the groups on it. If the
shrunk model, run on the example input, disagrees anywhere (or fails), the analysis
missed a dependency; the model is given back exactly as it was, and the error names the
first module whose shape is wrong.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from slimkit.errors import ConfigError
from slimkit.modes import eval_mode
from slimkit.prune.channels.analysis import Analysis
from slimkit.prune.channels.groups import ChannelGroup
from slimkit.prune.channels.shrink import shrink_
from slimkit.prune.channels.tracing import output_shapes

# Everything shrink_ replaces on a module, so that it can be put back.
_STATE = ("weight", "bias", "running_mean", "running_var",
          "in_channels", "out_channels", "groups", "in_features", "out_features", "num_features")


def shrink_checked_(
    model: nn.Module, keep: Mapping[ChannelGroup, torch.Tensor | Sequence[int]], analysis: Analysis, example_input: Any
) -> list[str]:
    """:func:`~slimkit.prune.channels.shrink.shrink_`, then run ``example_input`` through the
    shrunk model and compare every module's input and output shape with the analysis.

    Args:
        model: the model ``analysis`` was made of, not shrunk since.
        keep: as for ``shrink_``; the groups must come from ``analysis``.
        analysis: the analysis of ``model`` on ``example_input``.
        example_input: the input the analysis was made on.

    Returns:
        The qualified names of the modules that changed, sorted.

    Raises:
        ConfigError: what ``shrink_`` raises, or a shape differs from the prediction, or the
            shrunk model fails on the input. In the last two cases the message names the
            first module concerned and the model is restored: the same parameter and
            buffer objects, the same sizes.
    """
    foreign = [g for g in keep if not (g.index < len(analysis.groups) and analysis.groups[g.index] is g)]
    if foreign:
        raise ConfigError(f"group #{foreign[0].index} does not come from this analysis of the model; analyse it again")
    modules = dict(model.named_modules())
    saved = {
        name: {attr: getattr(modules[name], attr) for attr in _STATE if hasattr(modules[name], attr)}
        for name in {m.module for g in keep for m in g.members}
    }
    changed = shrink_(model, keep)
    if not changed:
        return changed
    kept = {g.index: len(torch.as_tensor(idx).flatten()) for g, idx in keep.items()}
    problem = _first_wrong_shape(model, analysis, kept, example_input)
    if problem is None:
        return changed
    for name, state in saved.items():
        for attr, value in state.items():
            setattr(modules[name], attr, value)
    raise ConfigError(
        f"channel pruning would leave a wrong shape: {problem}. The channel analysis missed a dependency "
        "there, so the model is left as it was; exclude the modules around it (exclude=[...]) to prune the rest"
    )


def _first_wrong_shape(model: nn.Module, analysis: Analysis, kept: Mapping[int, int], example_input: Any) -> str | None:
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    calls_of = defaultdict(list)
    for call in analysis.calls:
        calls_of[call.module].append(call)
    seen: dict[str, int] = defaultdict(int)
    problems: list[str] = []
    running: list[str] = []

    def describe(name: str) -> str:
        return f"module {name!r} ({type(model.get_submodule(name)).__name__})"

    def before(name: str, args: tuple) -> None:
        running.append(name)
        calls = calls_of.get(name, [])
        if seen[name] >= len(calls) or not args or not isinstance(args[0], torch.Tensor):
            return
        call = calls[seen[name]]
        expected = analysis.expected_shape(call.input, kept) if call.input else None
        if expected is not None and tuple(args[0].shape) != expected:
            problems.append(f"{describe(name)} receives {_fmt(args[0].shape)} from {call.source} where {_fmt(expected)} was expected")

    def after(name: str, output: Any) -> None:
        running.pop()
        calls = calls_of.get(name, [])
        if seen[name] >= len(calls):
            return
        call = calls[seen[name]]
        seen[name] += 1
        expected = analysis.expected_shape(call.node, kept)
        if expected is not None and isinstance(output, torch.Tensor) and tuple(output.shape) != expected:
            problems.append(f"{describe(name)} gives {_fmt(output.shape)} where {_fmt(expected)} was expected")

    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(lambda _m, args, name=name: before(name, args)))
        handles.append(module.register_forward_hook(lambda _m, _args, out, name=name: after(name, out)))
    try:
        with eval_mode(model), torch.no_grad():
            try:
                output = model(*inputs)
            except Exception as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                where = describe(running[-1]) if running and running[-1] else f"the forward of {type(model).__name__}"
                failure = f"the pruned model fails in {where} ({type(e).__name__}: {first})"
                return problems[0] if problems else failure
    finally:
        for h in handles:
            h.remove()
    if problems:
        return problems[0]
    shapes = output_shapes(output)
    if shapes != analysis.outputs:
        return f"the pruned model's output has shape {_fmts(shapes)} where the original's is {_fmts(analysis.outputs)}"
    return None


def _fmt(shape: Sequence[int]) -> str:
    return str(list(shape))


def _fmts(shapes: list[tuple[int, ...]]) -> str:
    return ", ".join(_fmt(s) for s in shapes)
