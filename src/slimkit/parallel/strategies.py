"""The strategy for a :class:`ParallelConfig`, by name."""

from __future__ import annotations

from slimkit.parallel.config import ParallelConfig
from slimkit.parallel.ddp import DataParallel
from slimkit.parallel.distributed import Distributed
from slimkit.parallel.fsdp import Sharded
from slimkit.parallel.pipeline import PipelineParallel
from slimkit.parallel.strategy import Single
from slimkit.parallel.tensor import ShardedTensorParallel, TensorParallel
from slimkit.parallel.world import World

STRATEGY_CLASSES: dict[str, type[Distributed]] = {
    "ddp": DataParallel,
    "fsdp": Sharded,
    "tp": TensorParallel,
    "fsdp+tp": ShardedTensorParallel,
    "pipeline": PipelineParallel,
}


def make_strategy(world: World, config: ParallelConfig) -> Single:
    """The strategy ``config`` names, for this process of ``world`` (``none``: the process
    trains alone, as one started by torchrun with one process does)."""
    if config.strategy == "none":
        return Single(world.device)
    return STRATEGY_CLASSES[config.strategy](world, config)
