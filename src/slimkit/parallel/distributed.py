"""What every multi-process strategy shares: agreement between processes, and batch checks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor

from slimkit.errors import ConfigError
from slimkit.parallel.config import ParallelConfig
from slimkit.parallel.strategy import Single
from slimkit.parallel.world import World


class Distributed(Single):
    """A strategy of several processes; subclasses wrap the model."""

    distributed = True
    # Whether an evaluation must run on every process (a sharded model needs all of them
    # to run its forward) or once, on the main process, with the result broadcast.
    evaluate_everywhere = False

    def __init__(self, world: World, config: ParallelConfig):
        super().__init__(world.device)
        self.world, self.config = world, config
        self.rank, self.size, self.main = world.rank, world.size, world.main
        self.dp_rank, self.dp_size = world.rank, world.size

    def check_batch(self, batch_size: int, n_examples: int) -> None:
        if batch_size < self.dp_size:
            raise ConfigError(
                f"batch_size: {batch_size} examples per micro-batch cannot be split across {self.dp_size} "
                f"data-parallel processes; raise batch_size to at least {self.dp_size} or lower nproc")
        if n_examples < self.dp_size:
            raise ConfigError(f"the data has {n_examples} examples, fewer than the {self.dp_size} data-parallel processes")

    def mean(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t)
        return (t / self.size).tolist()

    def agree(self, compute: Callable[[], Any]) -> Any:
        # Where every process must compute (a sharded forward), the main process's result
        # still decides: a last-bit difference must not let one process stop alone.
        result = compute() if self.evaluate_everywhere or self.main else None
        return self.from_main(result)

    def from_main(self, value: Any) -> Any:
        box = [value if self.main else None]
        dist.broadcast_object_list(box, src=0, device=self._comm_device)
        return box[0]

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float) -> None:
        # A sharded gradient's norm is a partial result on each process: full_tensor()
        # completes it (an all-reduce), so every process scales by the same global norm.
        norms = []
        for p in params:
            if p.grad is not None:
                n = torch.linalg.vector_norm(p.grad.float())
                norms.append(n.full_tensor() if isinstance(n, DTensor) else n)
        if not norms:
            return
        total = torch.linalg.vector_norm(torch.stack(norms))
        scale = min(1.0, max_norm / (float(total) + 1e-6))  # torch's clip_grad_norm_, same formula
        for p in params:
            if p.grad is not None:
                p.grad.mul_(scale)

    def full_state_dict(self, module: nn.Module) -> dict[str, torch.Tensor]:
        # Every process takes part in gathering sharded weights; the main one receives them.
        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def barrier(self) -> None:
        dist.barrier()

    @property
    def _comm_device(self) -> torch.device:
        # nccl moves only CUDA tensors; gloo only CPU ones.
        return self.device if self.world.backend == "nccl" else torch.device("cpu")
