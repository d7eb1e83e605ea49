"""Sharded data parallel: FSDP2 ``fully_shard`` (ZeRO-3).

Each process keeps ``1 / N`` of every parameter, its gradient and its optimizer state.
A sharded unit (by default each of the model's repeated blocks; the rest of the model is
the root unit) gathers its parameters just before its forward and backward and frees
them after, and gradients are reduce-scattered so that each process only ever holds its
own shard. ``fully_shard`` changes modules in place: names, hooks and checkpoint keys
stay those of the model.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)

from slimkit.errors import ConfigError
from slimkit.memory.checkpoint.blocks import resolve_blocks
from slimkit.parallel.distributed import Distributed
from slimkit.parallel.world import World


def shard_units(model: nn.Module, shard: str | list[str]) -> list[str]:
    """The modules of ``model`` that become their own sharded units, in definition order.

    ``auto`` takes the repeated blocks (BERT's ``encoder.layer.*``), else the children of
    the container (``Sequential`` or ``ModuleList``) with the most children that hold
    parameters (MobileNetV2's ``features.*``), else the top-level children that do; a list
    names modules or ``re:`` patterns.
    """
    if shard != "auto":
        return resolve_blocks(model, shard)
    try:
        return resolve_blocks(model, "auto")
    except ConfigError:
        pass
    best: list[str] = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Sequential, nn.ModuleList)):
            held = [f"{name}.{k}" if name else k for k, c in m.named_children() if any(True for _ in c.parameters())]
            if len(held) > len(best):
                best = held
    if len(best) >= 2:
        return best
    return [n for n, m in model.named_children() if any(True for _ in m.parameters())]


class Sharded(Distributed):
    """``strategy: fsdp`` (and the data-parallel half of ``fsdp+tp``)."""

    name = "fsdp"
    evaluate_everywhere = True  # every process takes part in gathering each unit

    def __init__(self, world: World, config: Any, mesh: DeviceMesh | None = None):
        super().__init__(world, config)
        self.mesh = mesh if mesh is not None else init_device_mesh(self.device.type, (world.size,))
        if config.cpu_offload and self.device.type == "cpu":
            raise ConfigError("parallel.cpu_offload: the model already lives in CPU memory on this machine "
                              "(no accelerator); remove cpu_offload")

    def _policies(self) -> dict[str, Any]:
        bf16 = self.config.mixed_precision == "bf16"
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
        offload = CPUOffloadPolicy() if self.config.cpu_offload else OffloadPolicy()
        return {"mesh": self.mesh, "mp_policy": mp, "offload_policy": offload}

    def wrap(self, student: nn.Module, projections: nn.ModuleDict, loss_probe: Callable[[], torch.Tensor]) -> Callable[..., Any]:
        self.shard_(student, projections, shard_units(student, self.config.shard))
        return student

    def shard_(self, student: nn.Module, projections: nn.ModuleDict, units: list[str]) -> None:
        """Make each of ``units`` a sharded unit, then the rest of the student, then each projection."""
        policies = self._policies()
        for name in units:
            fully_shard(student.get_submodule(name), **policies)
        fully_shard(student, **policies)
        for p in projections.values():
            # Used by the loss outside the student's forward: each gathers its own weights.
            fully_shard(p, **policies)
        self.sharded = [student, *projections.values()]

    def accumulating(self, last: bool) -> ContextManager[None]:
        # Gradients of the micro-batches before the last are kept unsharded and summed
        # locally; the last one's backward reduce-scatters the sum.
        for m in self.sharded:
            if isinstance(m, FSDPModule):
                m.set_requires_gradient_sync(last)
        return super().accumulating(last)
