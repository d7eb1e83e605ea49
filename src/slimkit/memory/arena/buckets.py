"""Shape buckets: what one bucket holds once planned and bound (:class:`_Bucket`), and
the executor's part that pads inputs up to a bucket and picks the bucket a request runs in."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from slimkit.errors import SlimkitError
from slimkit.memory.arena.lowerings import Kernel
from slimkit.memory.planner import MemoryPlan, TensorLife


@dataclass
class _Bucket:
    batch: int
    seq: int | None
    input_shapes: list[tuple[int, ...]]
    plan: MemoryPlan | None = None
    plain_plan: MemoryPlan | None = None  # the same graph without in-place reuse or copy elision
    lives: list[TensorLife] = field(default_factory=list)
    # filled when bound
    inputs: list[torch.Tensor] = field(default_factory=list)
    steps: list[tuple[str, Kernel]] = field(default_factory=list)
    outputs: list[Any] = field(default_factory=list)
    out_batch: list[bool] = field(default_factory=list)
    out_seq: list[tuple[int, ...]] = field(default_factory=list)
    out_spec: Any = None
    counts: dict[str, int] = field(default_factory=dict)
    step_output_bytes: dict[str, set[int]] = field(default_factory=dict)
    constant_bytes: int = 0
    pad_batch: bool = False  # requests with fewer rows may run here (outputs keep the batch dimension)
    pad_seq: bool = False  # requests with a shorter sequence may run here (the trace knows its symbol)



class _BucketSelection:
    """The executor's bucket logic: the example inputs padded up to a bucket, and the
    bucket a request runs in. Mixed into :class:`~slimkit.memory.arena.executor.ArenaExecutor`,
    whose ``config``, ``_examples``, ``_dtypes`` and ``_buckets`` it reads."""

    def _seq_inputs(self) -> list[bool]:
        return [bool(self.config.seq_buckets) and x.dim() > self.config.seq_dim for x in self._examples]

    def _bucket_inputs(self, batch: int, seq: int | None) -> list[torch.Tensor]:
        out = []
        pads = self.config.pad_values
        for i, (x, has_seq) in enumerate(zip(self._examples, self._seq_inputs(), strict=True)):
            if has_seq:
                d = self.config.seq_dim
                if x.shape[d] >= seq:
                    x = x.narrow(d, 0, seq)
                else:
                    shape = list(x.shape)
                    shape[d] = seq - x.shape[d]
                    pad = torch.full(shape, pads[i] if i < len(pads) else 0, dtype=x.dtype, device=x.device)
                    x = torch.cat([x, pad], d)
            out.append(x[torch.arange(batch, device=x.device) % x.shape[0]].contiguous())
        return out

    def bucket_for(self, batch: int, seq: int | None = None) -> tuple[int, int | None] | None:
        """The bucket ``(batch, seq)`` a request of that size runs in, or None."""
        b = next((x for x in self.config.batch_buckets if x >= batch), None)
        if b is None:
            return None
        if not self.config.seq_buckets:
            return (b, None)
        s = next((x for x in self.config.seq_buckets if seq is not None and x >= seq), None)
        return None if s is None else (b, s)

    def _select(self, inputs: Sequence[torch.Tensor]) -> _Bucket | None:
        if len(inputs) != len(self._dtypes):
            raise SlimkitError(f"the model was traced with {len(self._dtypes)} inputs, got {len(inputs)}")
        for i, (x, dt) in enumerate(zip(inputs, self._dtypes, strict=True)):
            if not isinstance(x, torch.Tensor) or x.dtype != dt:
                got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
                raise SlimkitError(f"input {i} is {got}; the model was traced with {dt}: convert it first")
        seq_inputs = self._seq_inputs()
        batch = inputs[0].shape[0] if inputs[0].dim() else 1
        seq = next((x.shape[self.config.seq_dim] for x, s in zip(inputs, seq_inputs, strict=True) if s), None)
        key = self.bucket_for(batch, seq)
        bucket = self._buckets.get(key) if key else None
        if bucket is None:
            return None
        for x, shape, has_seq in zip(inputs, bucket.input_shapes, seq_inputs, strict=True):
            want = list(shape)
            want[0] = batch
            if has_seq:
                want[self.config.seq_dim] = seq
            if list(x.shape) != want:
                return None
        if (batch != bucket.batch and not bucket.pad_batch) or (seq != bucket.seq and not bucket.pad_seq):
            return None
        return bucket

