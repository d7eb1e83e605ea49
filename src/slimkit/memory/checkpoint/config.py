"""Which blocks to checkpoint, to meet which budget, with which precision:
:class:`CheckpointConfig`."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import ByteSize, Field, field_validator

from slimkit.config import LayerSelector, SlimConfig


class CheckpointConfig(SlimConfig):
    """Which blocks to checkpoint, to meet which budget, with which precision.

    Attributes:
        budget: peak activation memory of one training step (forward and backward) to
            stay within, in bytes or as text (``"1.5GiB"``, ``"800MB"``). Activations are
            what the step allocates beyond parameters, their gradients and the inputs.
            ``None`` checkpoints every block.
        blocks: the modules that may be checkpointed. ``auto`` takes the repeated layers
            of the model (the longest ``ModuleList`` of same-type modules, such as
            ``encoder.layer.*``); otherwise qualified names or ``re:`` regexes, as a
            :class:`~slimkit.config.LayerSelector` or a list of patterns; an empty
            list checkpoints nothing (``autocast`` alone).
        autocast: ``bf16`` runs the model's forward (and the recompute) under
            ``torch.autocast`` in bfloat16 on the model's device type; activations saved
            by matmuls take half the bytes. Planning measures with the same setting.
        strategy: ``exact`` scores every subset of blocks (up to 16 blocks); ``greedy``
            adds the block that lowers the predicted peak most per second of recompute,
            then drops blocks that are not needed; ``auto`` is exact when it can be.
        verify: measure the chosen plan once and, while it is over the budget, add blocks.
        repeats: timed steps (after one warm-up) whose medians give the step time and
            each block's forward time.
        policy: what a checkpointed block recomputes. ``full`` keeps only the block's
            inputs and runs its whole forward again. ``selective`` also keeps the output
            of every matrix multiplication that contracts a dimension at least twice as
            wide as the one it produces (in a transformer layer, the FFN's down
            projection: a third of the layer's arithmetic for one hidden-sized tensor),
            so the recompute skips them: a little more memory for a cheaper backward.
            Planning to a ``budget`` measures full recomputation, so it needs ``full``.
    """

    kind: ClassVar[str] = "memory"
    method: ClassVar[str] = "checkpoint"

    budget: ByteSize | None = None
    blocks: LayerSelector | Literal["auto"] = "auto"
    autocast: Literal["none", "bf16"] = "none"
    strategy: Literal["auto", "exact", "greedy"] = "auto"
    verify: bool = True
    repeats: int = Field(default=3, ge=1)
    policy: Literal["full", "selective"] = "full"

    @field_validator("blocks", mode="before")
    @classmethod
    def _patterns(cls, v: Any) -> Any:
        if isinstance(v, str) and v != "auto":
            return LayerSelector(targets=[v])
        if isinstance(v, (list, tuple)):
            return LayerSelector(targets=list(v))
        return v

    @field_validator("budget")
    @classmethod
    def _positive(cls, v: ByteSize | None) -> ByteSize | None:
        if v is not None and v <= 0:
            raise ValueError("budget must be more than 0 bytes, e.g. '1.5GiB'")
        return v
