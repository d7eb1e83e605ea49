"""A model's footprint for the strategy advisor, measured on a real training step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from slimkit.distill.attention import HEAD_COUNT_ATTRIBUTES
from slimkit.errors import ConfigError
from slimkit.memory.checkpoint.apply import checkpoint_, remove_checkpointing_
from slimkit.memory.checkpoint.config import CheckpointConfig
from slimkit.memory.profiler import profile
from slimkit.memory.timeline import MemoryProfile
from slimkit.parallel.advisor import ModelFootprint
from slimkit.parallel.fsdp import shard_units
from slimkit.parallel.tensor import tensor_plan


def activation_peak(result: MemoryProfile) -> int:
    """The most bytes of activations and temporaries alive at once in the forward and
    backward of a profiled step (the optimizer's temporaries scale with the parameters,
    not the batch)."""
    return max((e.bytes.get("activations", 0) + e.bytes.get("temporaries", 0) for e in result.timeline
                if e.phase != "optimizer"), default=0)


def _tensor_parallel_layers(model: nn.Module) -> tuple[int, tuple[int, ...], list[str]]:
    """What tensor parallel would split: its parameter count, each block's heads, and the
    prefixes of the modules whose outputs it splits (each block's attention, with its
    projections, scores and context, and the first MLP layer)."""
    try:
        planned = tensor_plan(model, 1)
    except ConfigError:
        return 0, (), []
    split, heads, prefixes = 0, [], []
    for block, (plan, attention) in planned.items():
        b = model.get_submodule(block)
        # Column-wise layers split their weight and bias; row-wise ones only the weight.
        column = [f"{plan['attention']}.{c}" for c in plan["qkv"]] + [plan["mlp"][0]]
        split += sum(p.numel() for n in column for p in b.get_submodule(n).parameters())
        split += sum(b.get_submodule(n).weight.numel() for n in (plan["out"], plan["mlp"][1]))
        heads.append(next(getattr(attention, a) for a in HEAD_COUNT_ATTRIBUTES if isinstance(getattr(attention, a, None), int)))
        prefixes += [f"{block}.{plan['attention']}", f"{block}.{plan['mlp'][0]}"]
    return split, tuple(heads), prefixes


def measure_footprint(model: nn.Module, inputs: Any, examples: int, loss_fn: Callable[[Any], torch.Tensor] | None = None,
                      description: str = "") -> ModelFootprint:
    """Profile one training step of ``model`` on ``inputs`` (a batch of ``examples``), once
    as it is and once with every repeated block checkpointed, and describe it for the advisor."""
    params = [p for p in model.parameters() if p.requires_grad]
    units = shard_units(model, "auto")
    largest = max((sum(p.numel() for p in model.get_submodule(u).parameters()) for u in units), default=0)
    rest = sum(p.numel() for p in params) - sum(sum(p.numel() for p in model.get_submodule(u).parameters()) for u in units)
    split, heads, split_prefixes = _tensor_parallel_layers(model)
    plain = profile(model, inputs, train=True, loss_fn=loss_fn)
    acts = activation_peak(plain)
    live = {m.module: m.allocated_bytes for m in plain.modules}
    inside = sum(v for k, v in live.items() if any(k == p or k.startswith(p + ".") for p in split_prefixes))
    share = inside / sum(live.values()) if live and sum(live.values()) else 0.0
    checkpointed = acts
    if units:
        checkpoint_(model, CheckpointConfig(blocks=units))
        try:
            checkpointed = activation_peak(profile(model, inputs, train=True, loss_fn=loss_fn))
        finally:
            remove_checkpointing_(model)
    return ModelFootprint(parameters=sum(p.numel() for p in params), largest_unit=max(largest, rest), split=split,
                          heads=heads, activations_per_example=acts / examples,
                          checkpointed_per_example=checkpointed / examples, split_activation_share=share,
                          source="measured", description=description)
