"""Parallel training on torch.distributed: data parallel (DDP, ZeRO-1), sharded (FSDP2),
pipeline, tensor parallel and FSDP x TP, for every training stage; see ``docs/parallel.md``."""

from slimkit.parallel.config import ParallelConfig

__all__ = ["ParallelConfig"]
