"""Data parallel: :class:`torch.nn.parallel.DistributedDataParallel`, optionally with ZeRO-1.

Every process holds the whole student and computes its share of each global batch;
DDP averages the gradients in buckets while the backward pass runs. Micro-batches of a
step other than the last run under ``no_sync``, so gradient accumulation costs one
all-reduce per step. With ``zero1`` the optimizer state is partitioned across processes
(:class:`torch.distributed.optim.ZeroRedundancyOptimizer`).

The loop keeps its own reference to the student, whose names, hooks and checkpoint keys
are those of the model; DDP wraps a holder of the student and the loss's projections and
is called for the forward only.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from typing import Any

import torch
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel

from slimkit.parallel.distributed import Distributed
from slimkit.parallel.strategy import OptimizerFactory


class _Trainable(nn.Module):
    """The student and the projections as one module: DDP averages the gradients of both."""

    def __init__(self, student: nn.Module, projections: nn.ModuleDict):
        super().__init__()
        self.student, self.projections = student, projections

    def forward(self, **inputs: Any) -> Any:
        return self.student(**inputs)


def unreached_parameters(module: nn.Module, loss_probe: Callable[[], torch.Tensor]) -> list[str]:
    """Names of ``module``'s trainable parameters the loss does not reach (a BERT pooler
    under a mean-pooled embedding, say): DDP would wait for their gradients forever."""
    before = {n: p.grad for n, p in module.named_parameters()}
    for p in module.parameters():
        p.grad = None
    was = module.training
    module.eval()  # no dropout draws and no batch-norm statistics are changed
    try:
        loss_probe().backward()
        return [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None]
    finally:
        module.train(was)
        for n, p in module.named_parameters():
            p.grad = before[n]


class DataParallel(Distributed):
    """``strategy: ddp``."""

    name = "ddp"

    def wrap(self, student: nn.Module, projections: nn.ModuleDict, loss_probe: Callable[[], torch.Tensor]) -> Callable[..., Any]:
        holder = _Trainable(student, projections)
        ignored = unreached_parameters(holder, loss_probe)
        if ignored:
            # The documented way to leave parameters out of DDP's reducer (torch's own
            # wrappers use it); find_unused_parameters would instead fail on the
            # projections, which the loss uses outside the forward.
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(holder, ignored)
        # Gradients live in DDP's communication buckets instead of beside them: one copy of
        # the gradients per process, not two.
        self.ddp = DistributedDataParallel(holder, device_ids=[self.device] if self.device.type == "cuda" else None,
                                           gradient_as_bucket_view=True)
        return self.ddp

    def optimizer(self, factory: OptimizerFactory, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        if not self.config.zero1:
            return factory(params)
        # ZeRO builds the optimizer of each partition itself from its class and settings,
        # which a throwaway instance tells (the factory's own choices included).
        probe = factory([nn.Parameter(torch.zeros(1))])
        accepted = inspect.signature(type(probe)).parameters
        settings = {k: v for k, v in probe.defaults.items() if k in accepted}
        return ZeroRedundancyOptimizer(params, optimizer_class=type(probe), **settings)

    def accumulating(self, last: bool) -> ContextManager[None]:
        return super().accumulating(last) if last else self.ddp.no_sync()
