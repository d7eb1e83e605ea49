"""What the training loop asks of a parallel strategy, and the one-process strategy.

The loop (:class:`slimkit.distill.trainer.Distiller`) is written once. A strategy decides
which share of each global batch this process computes, how the student is wrapped,
how the optimizer is built, how gradients of accumulated micro-batches are held back,
and how a full copy of the weights is gathered. :class:`Single` does nothing of the
sort: it is the loop as it runs in one process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager as ContextManager
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


class Single:
    """One process, one device: the training loop unchanged."""

    name = "none"
    distributed = False
    # Whether the loop hands each micro-batch's forward and backward to the strategy
    # (pipeline parallel), and the prefix of this process's optimizer state in checkpoints.
    pipelined = False
    optimizer_prefix = ""
    # What a checkpoint must have been written under to resume here (None: any layout).
    layout: dict[str, Any] | None = None
    rank = 0
    size = 1
    main = True
    # Data-parallel coordinates: which share of a global batch this process takes.
    dp_rank = 0
    dp_size = 1

    def __init__(self, device: torch.device | str | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    # -- data ---------------------------------------------------------------------------
    def shard(self, idx: torch.Tensor) -> tuple[torch.Tensor, float]:
        """This process's examples of the global micro-batch ``idx`` (contiguous, sizes
        differing by at most one) and the weight of their mean loss, chosen so that the
        gradients the processes average are those of the whole micro-batch's mean loss.

        A process left without an example (a last micro-batch smaller than the processes)
        computes one with weight 0: it must still take part in the gradients' exchange.
        """
        local = idx.tensor_split(self.dp_size)[self.dp_rank]
        if len(local) == 0:
            return idx[:1], 0.0
        return local, len(local) * self.dp_size / len(idx)

    def check_batch(self, batch_size: int, n_examples: int) -> None:
        """Refuse a batch that cannot give every data-parallel process an example."""

    def check_training(self, config: Any, student: nn.Module) -> None:
        """Refuse loss terms or settings the strategy cannot compute as one process would."""

    # -- model --------------------------------------------------------------------------
    def wrap(self, student: nn.Module, projections: nn.ModuleDict, loss_probe: Callable[[], torch.Tensor]) -> Callable[..., Any]:
        """Prepare the student (and the loss's projections) for training; return the callable
        that runs the student's forward. ``loss_probe`` computes the loss of a small batch,
        for strategies that must see which parameters it reaches."""
        return student

    def optimizer(self, factory: OptimizerFactory, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return factory(params)

    def owned(self, name: str) -> bool:
        """Whether this process holds the trainable state named ``name`` (a pipeline stage
        holds its own layers only)."""
        return True

    def accumulating(self, last: bool) -> ContextManager[None]:
        """Around one micro-batch's forward and backward: gradients are synchronised only on
        the ``last`` micro-batch of a step."""
        return nullcontext()

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float) -> None:
        torch.nn.utils.clip_grad_norm_(params, max_norm)

    # -- agreement ----------------------------------------------------------------------
    def mean(self, values: list[float]) -> list[float]:
        """``values`` averaged over every process (the loss history: each process holds its
        weighted share, or all hold the same)."""
        return values

    def agree(self, compute: Callable[[], Any]) -> Any:
        """``compute()`` run where it must be and its result given to every process."""
        return compute()

    def from_main(self, value: Any) -> Any:
        """The main process's ``value``, on every process."""
        return value

    def barrier(self) -> None:
        """Wait until every process reaches this point."""

    def full_state_dict(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """Every weight of ``module`` in full, on the main process (an empty dict elsewhere)."""
        return {k: v.detach().cpu() for k, v in module.state_dict().items()}
