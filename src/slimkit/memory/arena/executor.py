"""The runtime: :class:`ArenaExecutor` traces and plans every bucket into one arena, then
serves requests from it (input copy and padding, the bound kernels in order, outputs cut
back to the request); :func:`build_arena` builds one."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils import _pytree as pytree

from slimkit.errors import ConfigError
from slimkit.memory.arena.binding import _KernelBinding
from slimkit.memory.arena.buckets import _Bucket, _BucketSelection
from slimkit.memory.arena.config import ArenaConfig
from slimkit.memory.arena.errors import ArenaFallbackWarning, TraceError
from slimkit.memory.arena.lifetimes import _Analysis
from slimkit.memory.arena.trace import _check_graph, _describe_export_error, _export, _ExportFailed
from slimkit.memory.planner import plan_memory


class ArenaExecutor(_BucketSelection, _KernelBinding):
    """Runs a traced model with its activations in one arena allocated at construction.

    Build it with :func:`build_arena`. Call it like the model: ``executor(*inputs)``.
    With ``copy=False`` the outputs are views of the arena, valid until the next call; a
    serving loop that consumes them before the next request allocates nothing.

    Attributes:
        fallback_reason: why the model runs eagerly (None when the arena is in use).
        arena_bytes: size of the arena (the largest plan over the buckets).
    """

    def __init__(self, module: nn.Module, example_inputs: Sequence[torch.Tensor], config: ArenaConfig | None = None):
        self.module = module.eval()
        self.config = config or ArenaConfig()
        self.fallback_reason: str | None = None
        self.arena_bytes = 0
        self._buckets: dict[tuple[int, int | None], _Bucket] = {}
        self._annotate = False
        self._warned: set[tuple] = set()
        examples = list(example_inputs)
        if not examples or not all(isinstance(x, torch.Tensor) for x in examples):
            raise ConfigError("example_inputs must be a non-empty sequence of tensors (the model's positional inputs)")
        self._dtypes = [x.dtype for x in examples]
        self._examples = [x.detach() for x in examples]
        self.device = examples[0].device
        try:
            self._build()
        except TraceError as e:
            self._fall_back(str(e), e.operator)

    # construction
    def _fall_back(self, reason: str, op: str | None) -> None:
        self.fallback_reason = reason
        self._buckets.clear()
        self._arena = None
        name = type(self.module).__name__
        warnings.warn(
            f"cannot plan an activation arena for {name}"
            + (f" (operator {op})" if op and op not in reason else "") + f": {reason}; running the model eagerly",
            ArenaFallbackWarning, stacklevel=3,
        )

    def _build(self) -> None:
        cfg = self.config
        keys = [(b, s) for b in cfg.batch_buckets for s in (cfg.seq_buckets or [None])]
        seq_inputs = self._seq_inputs()
        dims = {i: [0] + ([cfg.seq_dim] if has_seq else []) for i, has_seq in enumerate(seq_inputs)}
        # Trace at the largest bucket: export fixes a dimension of size 1 as a constant.
        big = self._bucket_inputs(max(cfg.batch_buckets), max(cfg.seq_buckets) if cfg.seq_buckets else None)
        shared = None
        try:
            shared = _export(self.module, big, dims)
        except _ExportFailed:  # a dynamic trace the model refuses; try fixed shapes per bucket
            shared = None
        if shared is not None:
            _check_graph(shared)
            if not self._covers(shared, dims, max(cfg.batch_buckets) > 1, bool(cfg.seq_buckets)):
                shared = None
        programs = {}
        for key in keys:
            inputs = self._bucket_inputs(*key)
            ep = shared
            if ep is None:
                try:
                    ep = _export(self.module, inputs, None)
                except _ExportFailed as e:
                    message, op = _describe_export_error(e, self.module)
                    raise TraceError(f"torch.export failed: {message}", op) from e
                _check_graph(ep)
            analysis = _Analysis(ep, self.module, inputs, cfg)
            bucket = _Bucket(key[0], key[1], [tuple(x.shape) for x in inputs], lives=analysis.lives)
            bucket.plan = plan_memory(analysis.lives, cfg.alignment, cfg.strategy)
            bucket.plain_plan = plan_memory(analysis.plain_lives, cfg.alignment, cfg.strategy)
            programs[key] = ep
            self._buckets[key] = bucket
            # Each analysis holds every eager intermediate of its bucket: keep one at a time.
            del analysis
        self.arena_bytes = max(b.plan.arena_bytes for b in self._buckets.values())
        # One arena and one staging buffer per input serve every bucket: one request runs at a time.
        self._arena = torch.empty(self.arena_bytes + cfg.alignment, dtype=torch.uint8, device=self.device)
        self._base = (-self._arena.data_ptr()) % cfg.alignment
        self._staging = [
            torch.empty(max(math.prod(b.input_shapes[i]) for b in self._buckets.values()), dtype=dt, device=self.device)
            for i, dt in enumerate(self._dtypes)
        ]
        for key, ep in programs.items():
            inputs = self._bucket_inputs(*key)
            analysis = _Analysis(ep, self.module, inputs, cfg)
            assert analysis.lives == self._buckets[key].lives, "the analysis of a bucket changed between runs"
            self._bind(self._buckets[key], analysis, inputs)
            del analysis
        self.staging_bytes = sum(s.numel() * s.element_size() for s in self._staging)

    @staticmethod
    def _covers(ep, dims: dict[int, list[int]], need_batch: bool, need_seq: bool) -> bool:
        """Whether the shared trace kept the batch (and sequence) dimension symbolic."""
        users = [n for n in ep.graph.nodes if n.op == "placeholder"][-len(dims):]
        for i, node in enumerate(users):
            shape = node.meta["val"].shape
            for j, d in enumerate(dims[i]):
                if (need_batch if j == 0 else need_seq) and isinstance(shape[d], int):
                    return False
        return True

    # running
    def __call__(self, *inputs: torch.Tensor, copy: bool = True):
        """Run the model on ``inputs``.

        Args:
            inputs: the model's positional tensor inputs.
            copy: return outputs in fresh memory (True) or as arena views that the next
                call overwrites (False: nothing is allocated).
        """
        if self.fallback_reason is not None:
            with torch.no_grad():
                return self.module(*inputs)
        bucket = self._select(inputs)
        if bucket is None:
            shape = tuple(tuple(x.shape) for x in inputs)
            if shape not in self._warned:
                self._warned.add(shape)
                warnings.warn(f"input shapes {shape} fit no planned bucket (batch buckets "
                              f"{self.config.batch_buckets}, sequence buckets {self.config.seq_buckets}); "
                              "running this request eagerly", ArenaFallbackWarning, stacklevel=2)
            with torch.no_grad():
                return self.module(*inputs)
        batch = inputs[0].shape[0]
        seq_inputs = self._seq_inputs()
        d = self.config.seq_dim
        seq = None
        with torch.no_grad():
            for i, (x, stage, has_seq) in enumerate(zip(inputs, bucket.inputs, seq_inputs, strict=True)):
                if x.shape == stage.shape:
                    stage.copy_(x)
                    continue
                rows = stage[:batch]
                if has_seq:
                    seq = x.shape[d]
                    rows.narrow(d, 0, seq).copy_(x)
                    if seq < stage.shape[d]:
                        pads = self.config.pad_values
                        rows.narrow(d, seq, stage.shape[d] - seq).fill_(pads[i] if i < len(pads) else 0)
                else:
                    rows.copy_(x)
                if batch < stage.shape[0]:
                    stage[batch:].copy_(stage[:1].expand_as(stage[batch:]))
            if self._annotate:
                for name, kernel in bucket.steps:
                    with torch.profiler.record_function(name):
                        kernel()
            else:
                for _, kernel in bucket.steps:
                    kernel()
            outs = []
            for value, has_batch, seq_dims in zip(bucket.outputs, bucket.out_batch, bucket.out_seq, strict=True):
                if isinstance(value, torch.Tensor):
                    if has_batch and batch != bucket.batch:
                        value = value[:batch]
                    if seq is not None and seq != bucket.seq:
                        for sd in seq_dims:
                            value = value.narrow(sd, 0, seq)
                    if copy:
                        value = value.clone()
                outs.append(value)
        return pytree.tree_unflatten(outs, bucket.out_spec)

    def warm_up(self, rounds: int = 2) -> None:
        """Run every bucket ``rounds`` times on its example inputs, so that kernels set up
        whatever they cache before the first real request."""
        if self.fallback_reason is not None:
            return
        for bucket in self._buckets.values():
            inputs = self._bucket_inputs(bucket.batch, bucket.seq)
            for _ in range(rounds):
                self(*inputs, copy=False)

    def summary(self) -> dict:
        """Per bucket: lower bound, arena and no-reuse bytes, the strategy kept, and how
        operators were bound (out= overload, lowered, in place, copy elided, copied)."""
        if self.fallback_reason is not None:
            return {"fallback": self.fallback_reason, "buckets": []}
        return {
            "fallback": None,
            "arena_bytes": self.arena_bytes,
            "staging_bytes": self.staging_bytes,
            "buckets": [
                {"batch": b.batch, "seq": b.seq, "tensors": len(b.lives), **b.plan.to_dict(),
                 "without_reuse": {k: b.plain_plan.to_dict()[k] for k in ("lower_bound_bytes", "arena_bytes", "no_reuse_bytes")},
                 "constant_bytes": b.constant_bytes, "ops": dict(b.counts),
                 "pads_batch": b.pad_batch, "pads_seq": b.pad_seq}
                for b in self._buckets.values()
            ],
        }

    @property
    def buckets(self) -> list[tuple[int, int | None]]:
        return list(self._buckets)


def build_arena(
    model, example_inputs: Sequence[torch.Tensor] | None = None, config: ArenaConfig | None = None
) -> ArenaExecutor:
    """Trace ``model``, plan its activations into one arena per shape bucket, and return
    an executor that runs it there.

    Args:
        model: an ``nn.Module`` or a :class:`slimkit.zoo.models.LoadedModel`.
        example_inputs: the model's positional tensor inputs (default: the loaded model's
            ``example_inputs``). They give dtypes and non-batch shapes, and the values the
            kernels are checked on.
        config: buckets, alignment, strategy (default :class:`ArenaConfig`).

    A model the planner cannot trace runs eagerly behind the same interface, after an
    :class:`ArenaFallbackWarning` naming the operator; ``executor.fallback_reason`` says why.
    """
    module = getattr(model, "module", model)
    if example_inputs is None:
        example_inputs = getattr(model, "example_inputs", None)
    if not example_inputs:
        raise ConfigError("give example_inputs: the model's positional tensor inputs")
    return ArenaExecutor(module, example_inputs, config)
