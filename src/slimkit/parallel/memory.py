"""What one process of a parallel job holds: its shards of parameters, gradients and
optimizer state, counted tensor by tensor.

A sharded tensor (DTensor) counts its local shard only, and each storage is counted once
(DDP's gradients are views into its communication buckets, which are counted whole).
This is what the live-storage profiler cannot tell under FSDP, which frees and refills
gathered parameters by resizing their storages in place.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.distributed.tensor import DTensor


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _bytes(tensors: Iterable[torch.Tensor], seen: set[tuple[str, int]]) -> int:
    total = 0
    for t in tensors:
        local = _local(t)
        storage = local.untyped_storage()
        key = (str(local.device), storage.data_ptr())
        if storage.nbytes() == 0 or key in seen:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


def training_state_bytes(module: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes this process holds for ``module``'s parameters, their gradients and the
    optimizer's state (a ZeRO-1 optimizer's own partition), each storage once."""
    seen: set[tuple[str, int]] = set()
    params = list(module.parameters())
    out = {"parameters": _bytes(params, seen),
           "gradients": _bytes((p.grad for p in params if p.grad is not None), seen)}
    state = getattr(optimizer, "optim", optimizer)  # ZeroRedundancyOptimizer keeps its partition's optimizer
    tensors = [v for s in (state.state.values() if state is not None else []) for v in s.values()
               if isinstance(v, torch.Tensor)]
    out["optimizer_state"] = _bytes(tensors, seen)
    out["total"] = sum(out.values())
    return out
