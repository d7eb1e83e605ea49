"""How to plan and run an activation arena: :class:`ArenaConfig` (buckets, padding,
alignment, strategy, per-node check tolerances)."""

from __future__ import annotations

from typing import Literal

from pydantic import field_validator

from slimkit.config import SlimConfig


class ArenaConfig(SlimConfig):
    """How to plan and run an activation arena.

    Attributes:
        batch_buckets: batch sizes to plan for; a request runs in the smallest bucket that
            holds it, padded up to it.
        seq_buckets: sequence lengths to plan for (empty: inputs have no sequence
            dimension, so their non-batch shape must match the example inputs). Padding
            along the sequence is only correct for models that mask padded positions
            (attention masks), which is why it must be asked for.
        seq_dim: the sequence dimension of every input that has one.
        pad_values: value written into padded sequence positions, one per input
            (missing ones are 0: the [PAD] token id, and 0 in an attention mask).
        alignment: every offset in the arena is a multiple of it (bytes, a power of two).
        strategy: planning strategy, or ``auto`` for the best per graph.
        reuse_inputs: let elementwise operators write over an input that dies there, and
            turn copies of dying tensors into no-ops.
        check_rtol: relative tolerance of the per-node check of every kernel at warm-up.
        check_atol: absolute tolerance of that check.
    """

    kind = "memory"
    method = "arena"
    batch_buckets: list[int] = [1]
    seq_buckets: list[int] = []
    seq_dim: int = 1
    pad_values: list[float] = []
    alignment: int = 64
    strategy: Literal["auto", "greedy_by_size", "greedy_by_breadth", "greedy_by_lifetime"] = "auto"
    reuse_inputs: bool = True
    check_rtol: float = 1e-4
    check_atol: float = 1e-5

    @field_validator("batch_buckets", "seq_buckets")
    @classmethod
    def _buckets(cls, v: list[int]) -> list[int]:
        if any(b < 1 for b in v):
            raise ValueError(f"bucket sizes must be >= 1, got {v}")
        return sorted(set(v))

    @field_validator("batch_buckets")
    @classmethod
    def _some_batch(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("give at least one batch bucket, such as [1]")
        return v

    @field_validator("seq_dim")
    @classmethod
    def _seq_dim(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"seq_dim must be >= 1 (dimension 0 is the batch), got {v}")
        return v

    @field_validator("alignment")
    @classmethod
    def _alignment(cls, v: int) -> int:
        if v < 8 or v & (v - 1):
            raise ValueError(f"alignment must be a power of two >= 8, got {v}")
        return v
