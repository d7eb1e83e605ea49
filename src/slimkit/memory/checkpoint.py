"""Activation checkpointing chosen to meet a memory budget, optionally with bf16 autocast.

A checkpointed block keeps only its inputs during the forward and runs its forward again
in the backward to rebuild what its backward needs: memory for compute. Which blocks to
checkpoint is a trade: each saves some bytes and costs one more forward of the block.

    profile = profile_checkpointing(model, batch, loss_fn)    # measure once
    plan = plan_checkpointing(model, batch, loss_fn, "1.5GiB", profile=profile)
    handle = checkpoint_(model, plan)                         # train ...
    handle.remove()                                           # ... and undo

The profile comes from measured steps, not from formulas: one step timed per block, one
step whose live tensor storages are followed through the forward and backward (see
:mod:`slimkit.memory.peak`), and one step with every block checkpointed. From these it
predicts the peak of any choice of blocks; the plan picks the choice that meets the
budget with the least recompute time, then measures it and adds blocks if the
measurement is over.
"""

from __future__ import annotations

import statistics
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import ByteSize, Field, field_validator
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts
from torch.utils.checkpoint import checkpoint as _torch_checkpoint

from slimkit.batches import call_with
from slimkit.config import LayerSelector, SlimConfig
from slimkit.errors import ConfigError, LayerSelectionError, SlimkitError
from slimkit.layers import select_names
from slimkit.memory.peak import LiveStorageCounter, measure_activation_peak, preallocated_grads

Batch = Any  # a Tensor, a tuple of positional inputs, or a dict of keyword inputs
LossFn = Callable[[Any], torch.Tensor]

EXACT_MAX_BLOCKS = 16  # 2^16 choices are scored at once with numpy; beyond that, greedy


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


# -- the profile: what each block costs and saves ------------------------------------


@dataclass(frozen=True)
class BlockProfile:
    """One block, as measured in a step without checkpointing.

    Attributes:
        name: qualified name of the module.
        saved_bytes: bytes the block's forward creates and keeps for the backward,
            not counting its output.
        output_bytes: bytes of the block's output (kept either way: the next block
            needs it).
        boundary_bytes: bytes of inputs a checkpoint would keep that the step would
            otherwise have freed before the backward.
        saving_bytes: ``saved_bytes - boundary_bytes``: what checkpointing the block
            frees while the later blocks run and are differentiated.
        recompute_extra_bytes: how much higher the block's own backward goes when it is
            checkpointed: its kept inputs, or the temporaries of the forward that runs
            again inside it, whichever is more.
        forward_seconds: median forward time: the predicted cost of recomputing it.
    """

    name: str
    saved_bytes: int
    output_bytes: int
    boundary_bytes: int
    saving_bytes: int
    recompute_extra_bytes: int
    forward_seconds: float


@dataclass(frozen=True)
class _Phase:
    # A stretch of the baseline step. Checkpointing block j lowers its peak by j's
    # saving when j < before (j ran before it and is not yet differentiated); if own is
    # a checkpointed block, its recompute adds that block's recompute_extra_bytes.
    peak_bytes: int
    before: int
    own: int
    kind: str = ""  # before, forward, between, backward, after backward
    where: str = ""  # for messages: "the backward of encoder.layer.3"


@dataclass
class CheckpointProfile:
    """Measurements that predict the peak and time of any choice of blocks.

    Attributes:
        blocks: the blocks in the order the forward runs them.
        autocast: the precision the measurements were taken with.
        device: where the steps ran.
        inputs: shapes of the example batch's tensors, for messages.
        step_seconds: median time of a training step without checkpointing.
        max_peak_bytes: measured activation peak with no block checkpointed.
        min_peak_bytes: the least activation peak checkpointing these blocks can reach,
            measured with ``min_blocks`` checkpointed.
        min_blocks: the choice predicted to give the least peak: usually every block, but
            recomputing a block late in the forward can cost more than it saves.
        measure_method: ``storages`` or ``cuda_allocator`` (see
            :func:`~slimkit.memory.peak.measure_activation_peak`).
    """

    blocks: list[BlockProfile]
    autocast: str
    device: str
    inputs: dict[str, list[int]]
    step_seconds: float
    max_peak_bytes: int
    min_peak_bytes: int
    min_blocks: list[str]
    measure_method: str
    phases: list[_Phase] = field(repr=False, default_factory=list)
    offset_bytes: int = 0  # allocator peak minus tracked peak, added to predictions on CUDA

    @property
    def names(self) -> list[str]:
        return [b.name for b in self.blocks]

    def predict_peak(self, chosen: Sequence[str]) -> int:
        """Predicted activation peak of a step with the blocks ``chosen`` checkpointed."""
        mask = np.zeros((1, len(self.blocks)), dtype=bool)
        mask[0, self._indices(chosen)] = True
        return int(self._peaks(mask)[0])

    def predict_extra_seconds(self, chosen: Sequence[str]) -> float:
        """Predicted extra step time: one more forward of every chosen block."""
        return float(sum(self.blocks[i].forward_seconds for i in self._indices(chosen)))

    def lowest(self) -> list[str]:
        """The choice with the least predicted peak (and, among equals, the least time)."""
        return self.choose(0, "auto", best_effort=True)

    def choose(self, budget: int, strategy: str = "auto", best_effort: bool = False) -> list[str]:
        """The blocks whose checkpointing is predicted to meet ``budget`` most cheaply.

        When no choice is predicted to meet the budget, returns the choice with the least
        predicted peak if ``best_effort``, else every block (the caller measures and
        decides).
        """
        n = len(self.blocks)
        if strategy == "exact" and n > EXACT_MAX_BLOCKS:
            raise ConfigError(f"strategy: 'exact' scores all 2^n choices and is limited to "
                              f"{EXACT_MAX_BLOCKS} blocks; this model has {n}; use 'greedy' or 'auto'")
        if strategy in ("auto", "exact") and n <= EXACT_MAX_BLOCKS:
            chosen = self._choose_exact(budget, best_effort)
        else:
            chosen = self._choose_greedy(budget, best_effort)
        return [self.blocks[i].name for i in sorted(chosen)]

    def frontier(self) -> list[dict[str, Any]]:
        """For each number of checkpointed blocks, the choice with the lowest predicted peak.

        The trade-off curve of this model: how low the peak goes for how much recompute.
        Exact up to 16 blocks; beyond that, the first k blocks (which free memory for
        the largest part of the step).
        """
        n = len(self.blocks)
        if n <= EXACT_MAX_BLOCKS:
            mask = _all_subsets(n)
        else:
            mask = np.tril(np.ones((n + 1, n), dtype=bool), -1)
        peaks = self._peaks(mask)
        cost = mask @ np.array([b.forward_seconds for b in self.blocks])
        sizes = mask.sum(1)
        out = []
        for k in range(n + 1):
            rows = np.flatnonzero(sizes == k)
            best = rows[np.lexsort((cost[rows], peaks[rows]))[0]]
            out.append({"blocks": [self.blocks[i].name for i in np.flatnonzero(mask[best])],
                        "predicted_peak_bytes": int(peaks[best]), "predicted_extra_seconds": float(cost[best])})
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device, "autocast": self.autocast, "inputs": self.inputs,
            "measure_method": self.measure_method, "step_seconds": self.step_seconds,
            "max_peak_bytes": self.max_peak_bytes, "min_peak_bytes": self.min_peak_bytes,
            "min_blocks": self.min_blocks, "predicted_min_peak_bytes": self.predict_peak(self.min_blocks),
            "blocks": [asdict(b) for b in self.blocks], "frontier": self.frontier(),
        }

    # -- internals --------------------------------------------------------------------

    def peak_phase(self, chosen: Sequence[str]) -> _Phase:
        """The part of the step where the predicted peak of ``chosen`` falls."""
        idx = self._indices(chosen)
        saving = [b.saving_bytes if i in idx else 0 for i, b in enumerate(self.blocks)]

        def peak(ph: _Phase) -> float:
            extra = self.blocks[ph.own].recompute_extra_bytes if ph.own in idx else 0
            return ph.peak_bytes - sum(saving[: ph.before]) + extra

        return max(self.phases, key=peak)

    def _indices(self, chosen: Sequence[str]) -> list[int]:
        index = {b.name: i for i, b in enumerate(self.blocks)}
        unknown = [c for c in chosen if c not in index]
        if unknown:
            raise LayerSelectionError(f"{unknown} are not blocks of this profile; its blocks are {list(index)}")
        return [index[c] for c in chosen]

    def _peaks(self, mask: np.ndarray) -> np.ndarray:
        """Predicted peaks for a [choices, blocks] boolean mask, vectorised over choices."""
        saving = np.array([b.saving_bytes for b in self.blocks], dtype=np.float64)
        extra = np.array([b.recompute_extra_bytes for b in self.blocks], dtype=np.float64)
        freed = np.concatenate([np.zeros((mask.shape[0], 1)), np.cumsum(mask * saving, axis=1)], axis=1)
        peaks = np.full(mask.shape[0], -np.inf)
        for ph in self.phases:
            p = ph.peak_bytes - freed[:, ph.before]
            if ph.own >= 0:
                p = p + mask[:, ph.own] * extra[ph.own]
            peaks = np.maximum(peaks, p)
        return peaks + self.offset_bytes

    def _choose_exact(self, budget: int, best_effort: bool) -> list[int]:
        n = len(self.blocks)
        mask = _all_subsets(n)
        peaks = self._peaks(mask)
        cost = mask @ np.array([b.forward_seconds for b in self.blocks])
        ok = peaks <= budget
        if not ok.any():
            if not best_effort:
                return list(range(n))
            ok = peaks <= peaks.min()
        # Least recompute time; among equals, fewer blocks, then the lower peak.
        order = np.lexsort((peaks, mask.sum(1), np.round(cost, 9)))
        best = next(i for i in order if ok[i])
        return [int(i) for i in np.flatnonzero(mask[best])]

    def _choose_greedy(self, budget: int, best_effort: bool) -> list[int]:
        n = len(self.blocks)
        chosen: set[int] = set()

        def peak(s: set[int]) -> float:
            m = np.zeros((1, n), dtype=bool)
            m[0, list(s)] = True
            return float(self._peaks(m)[0])

        current = peak(chosen)
        while current > budget and len(chosen) < n:
            rest = [i for i in range(n) if i not in chosen]
            gains = {i: (current - peak(chosen | {i})) / max(self.blocks[i].forward_seconds, 1e-9) for i in rest}
            best = max(rest, key=lambda i: (gains[i], self.blocks[i].saving_bytes, -i))
            chosen.add(best)
            current = peak(chosen)
        if current > budget:
            if not best_effort:
                return list(range(n))
            budget = int(current)
        # Drop what turned out unnecessary, dearest first.
        for i in sorted(chosen, key=lambda i: -self.blocks[i].forward_seconds):
            if peak(chosen - {i}) <= budget:
                chosen.discard(i)
        return sorted(chosen)



def _all_subsets(n: int) -> np.ndarray:
    codes = np.arange(2**n, dtype=np.int64)
    return ((codes[:, None] >> np.arange(n)) & 1).astype(bool)


# -- the plan: a choice for a budget ---------------------------------------------------


@dataclass
class CheckpointPlan:
    """The blocks to checkpoint for a budget, and what that is predicted and measured to do.

    Attributes:
        profile: the measurements the choice was made from.
        budget_bytes: the budget, or None for every block.
        chosen: qualified names of the blocks to checkpoint.
        predicted_peak_bytes: the profile's prediction for ``chosen``.
        measured_peak_bytes: the peak measured with ``chosen`` (None when not verified).
        predicted_extra_seconds: recompute time added to each step.
        checks: each verification: blocks tried, predicted and measured peak.
    """

    profile: CheckpointProfile
    budget_bytes: int | None
    chosen: list[str]
    predicted_peak_bytes: int
    measured_peak_bytes: int | None
    predicted_extra_seconds: float
    checks: list[dict[str, Any]] = field(default_factory=list)

    @property
    def autocast(self) -> str:
        return self.profile.autocast

    @property
    def min_peak_bytes(self) -> int:
        return self.profile.min_peak_bytes

    @property
    def max_peak_bytes(self) -> int:
        return self.profile.max_peak_bytes

    @property
    def predicted_time_ratio(self) -> float:
        """Predicted step time with the plan over the step time without checkpointing."""
        return (self.profile.step_seconds + self.predicted_extra_seconds) / self.profile.step_seconds

    @property
    def meets_budget(self) -> bool:
        peak = self.measured_peak_bytes if self.measured_peak_bytes is not None else self.predicted_peak_bytes
        return self.budget_bytes is None or peak <= self.budget_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "budget_bytes": self.budget_bytes, "chosen": self.chosen, "autocast": self.autocast,
            "min_peak_bytes": self.min_peak_bytes, "max_peak_bytes": self.max_peak_bytes,
            "predicted_peak_bytes": self.predicted_peak_bytes, "measured_peak_bytes": self.measured_peak_bytes,
            "predicted_extra_seconds": self.predicted_extra_seconds,
            "predicted_time_ratio": self.predicted_time_ratio, "checks": self.checks,
            "profile": self.profile.to_dict(),
        }

    def summary(self) -> str:
        peak = self.measured_peak_bytes if self.measured_peak_bytes is not None else self.predicted_peak_bytes
        which = "measured" if self.measured_peak_bytes is not None else "predicted"
        budget = "none" if self.budget_bytes is None else _fmt(self.budget_bytes)
        return (f"checkpoint {len(self.chosen)}/{len(self.profile.blocks)} blocks (autocast {self.autocast}): "
                f"peak {_fmt(peak)} ({which}) for budget {budget}; reachable {_fmt(self.min_peak_bytes)} "
                f"({len(self.profile.min_blocks)} blocks) to {_fmt(self.max_peak_bytes)} (none); predicted step time "
                f"x{self.predicted_time_ratio:.2f}")


# -- applying it -------------------------------------------------------------------------


class _CheckpointedForward:
    """A block's instance ``forward``: under autograd, run it inside a checkpoint.

    A callable object rather than a closure, so that ``copy.deepcopy`` of the model
    points the copy's forward at the copied block.
    """

    def __init__(self, module: nn.Module, previous: Callable[..., Any] | None, policy: str = "full"):
        self.module = module
        self.previous = previous
        self.policy = policy

    def _forward(self) -> Callable[..., Any]:
        return self.previous or type(self.module).forward.__get__(self.module)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        fn = self._forward()
        if not torch.is_grad_enabled():  # inference: nothing is saved, nothing to recompute
            return fn(*args, **kwargs)
        fn = _running_stats_once(fn, self.module)
        # Non-reentrant: works with keyword arguments, with inputs that need no grad, and
        # with torch.autograd.grad; the RNG state is restored so dropout masks repeat.
        if self.policy == "selective":
            return _torch_checkpoint(fn, *args, use_reentrant=False, context_fn=_selective_contexts, **kwargs)
        return _torch_checkpoint(fn, *args, use_reentrant=False, **kwargs)


def _running_stats_once(fn: Callable[..., Any], block: nn.Module) -> Callable[..., Any]:
    """``fn`` whose second and later calls leave the block's batch-norm statistics as they were.

    The recompute in the backward runs a training-mode forward again: batch norms would
    update their running statistics twice per step, and a checkpointed CNN would end with
    other statistics than the same training without checkpointing.
    """
    norms = [m for m in block.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return fn
    calls = [0]

    def run(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == 1:
            return fn(*args, **kwargs)
        saved = [(m, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in norms]
        try:
            return fn(*args, **kwargs)
        finally:
            with torch.no_grad():
                for m, mean, var, count in saved:
                    m.running_mean.copy_(mean)
                    m.running_var.copy_(var)
                    m.num_batches_tracked.copy_(count)

    return run


_MATMULS = {torch.ops.aten.mm.default: 0, torch.ops.aten.bmm.default: 0,
            torch.ops.aten.addmm.default: 1, torch.ops.aten.baddbmm.default: 1}  # where the two factors start


def _keep_wide_contractions(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """Keep the outputs of matmuls whose contracted dimension is at least twice their
    output's: they cost the most arithmetic per byte kept."""
    start = _MATMULS.get(op)
    if start is not None:
        a, b = args[start], args[start + 1]
        if a.shape[-1] >= 2 * b.shape[-1]:
            return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts() -> tuple[Any, Any]:
    return create_selective_checkpoint_contexts(_keep_wide_contractions)


class _AutocastForward:
    """The model's instance ``forward``: run it under bf16 autocast on its device type."""

    def __init__(self, module: nn.Module, previous: Callable[..., Any] | None):
        self.module = module
        self.previous = previous

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        fn = self.previous or type(self.module).forward.__get__(self.module)
        with torch.autocast(_device(self.module).type, dtype=torch.bfloat16):
            return fn(*args, **kwargs)


@dataclass
class CheckpointHandle:
    """What :func:`checkpoint_` changed; ``remove()`` puts the model back."""

    model: nn.Module
    blocks: list[str]
    autocast: str
    plan: CheckpointPlan | None = None
    policy: str = "full"

    def remove(self) -> None:
        """Undo: the blocks' and the model's ``forward`` are what they were before."""
        _unwrap(self.model)


def checkpoint_(
    model: nn.Module,
    plan_or_config: CheckpointPlan | CheckpointConfig | None = None,
    example_batch: Batch | None = None,
    loss_fn: LossFn | None = None,
) -> CheckpointHandle:
    """Checkpoint blocks of ``model`` in place, and optionally run it under bf16 autocast.

    Args:
        model: the model; its parameters and names do not change.
        plan_or_config: a :class:`CheckpointPlan` (its chosen blocks and autocast), or a
            :class:`CheckpointConfig`: without a budget every selected block is
            checkpointed; with one, the blocks are planned first, which needs
            ``example_batch`` and ``loss_fn`` (see :func:`plan_checkpointing`).
            ``None`` checkpoints every auto-detected block.

    Returns:
        A handle whose ``remove()`` undoes this; calling ``checkpoint_`` again replaces
        what an earlier call did.
    """
    plan, policy = None, "full"
    if isinstance(plan_or_config, CheckpointPlan):
        plan = plan_or_config
        names, autocast = plan.chosen, plan.autocast
    else:
        config = plan_or_config or CheckpointConfig()
        policy = config.policy
        if config.budget is None:
            names, autocast = resolve_blocks(model, config.blocks), config.autocast
        else:
            if example_batch is None or loss_fn is None:
                raise ConfigError("a budget needs a plan, and planning runs training steps: pass example_batch "
                                  "and loss_fn to checkpoint_, or pass a plan from plan_checkpointing")
            plan = plan_checkpointing(model, example_batch, loss_fn, config=config)
            names, autocast = plan.chosen, plan.autocast
    _unwrap(model)
    _wrap(model, names, autocast, policy)
    return CheckpointHandle(model, list(names), autocast, plan, policy)


def remove_checkpointing_(model: nn.Module) -> None:
    """Undo every :func:`checkpoint_` on ``model`` (when its handle is not at hand)."""
    _unwrap(model)


def checkpointed_blocks(model: nn.Module) -> list[str]:
    """Qualified names of the blocks of ``model`` that :func:`checkpoint_` wrapped."""
    return [n for n, m in model.named_modules() if isinstance(m.__dict__.get("forward"), _CheckpointedForward)]


def _wrap(model: nn.Module, names: Sequence[str], autocast: str, policy: str = "full") -> None:
    modules = []
    for name in names:
        if not name:
            raise LayerSelectionError("the whole model cannot be a block; choose its submodules")
        try:
            modules.append(model.get_submodule(name))
        except AttributeError:
            raise LayerSelectionError(f"the model has no module {name!r} to checkpoint") from None
    for m in modules:
        m.forward = _CheckpointedForward(m, m.__dict__.get("forward"), policy)
    if autocast == "bf16":
        model.forward = _AutocastForward(model, model.__dict__.get("forward"))


def _unwrap(model: nn.Module) -> None:
    for m in model.modules():
        fwd = m.__dict__.get("forward")
        while isinstance(fwd, (_CheckpointedForward, _AutocastForward)):
            if fwd.previous is None:
                del m.forward
            else:
                m.forward = fwd.previous
            fwd = m.__dict__.get("forward")


@contextmanager
def _applied(model: nn.Module, names: Sequence[str], autocast: str) -> Iterator[None]:
    """Checkpoint ``names`` for the duration; whatever checkpoint_ did before comes back."""
    before = [(m, m.__dict__["forward"]) for m in model.modules() if "forward" in m.__dict__]
    _unwrap(model)
    _wrap(model, names, autocast)
    try:
        yield
    finally:
        _unwrap(model)
        for m, fwd in before:
            m.forward = fwd


# -- choosing blocks ------------------------------------------------------------------


def resolve_blocks(model: nn.Module, blocks: LayerSelector | Literal["auto"] | Sequence[str] = "auto") -> list[str]:
    """Qualified names of the blocks ``blocks`` chooses in ``model``, in definition order.

    ``auto`` finds the model's repeated layers: the longest ``ModuleList`` (or
    ``Sequential``) whose children all have one type, such as BERT's ``encoder.layer``.
    An empty list chooses no block (for autocast alone).

    Raises:
        ConfigError: ``auto`` found no repeated layers, or chosen blocks nest.
        LayerSelectionError: a pattern matches no module.
    """
    if isinstance(blocks, str) and blocks == "auto":
        names = _auto_blocks(model)
    else:
        selector = blocks if isinstance(blocks, LayerSelector) else LayerSelector(targets=list(blocks))
        if not selector.targets:
            return []
        names = select_names([n for n, _ in model.named_modules() if n], selector, what="module")
        if not names:
            raise LayerSelectionError(f"{selector.targets} minus {selector.ignore} leaves no module to checkpoint")
    nested = [(a, b) for a in names for b in names if b.startswith(a + ".")]
    if nested:
        a, b = nested[0]
        raise ConfigError(f"blocks: {b!r} is inside {a!r}; a checkpointed block recomputes everything in it, "
                          "so choose one or the other (e.g. add the inner one to ignore)")
    return names


def _auto_blocks(model: nn.Module) -> list[str]:
    best: tuple[int, int, str, list[str]] | None = None
    for name, m in model.named_modules():
        if not isinstance(m, (nn.ModuleList, nn.Sequential)) or len(m) < 2:
            continue
        kinds = {type(c) for c in m}
        if len(kinds) != 1 or not any(True for _ in next(iter(m)).parameters()):
            continue
        size = sum(p.numel() for p in m.parameters())
        children = [f"{name}.{k}" if name else k for k, _ in m.named_children()]
        if best is None or (len(m), size) > (best[0], best[1]):
            best = (len(m), size, name, children)
    if best is None:
        raise ConfigError("blocks: 'auto' found no repeated layers (a ModuleList of same-type modules with "
                          "parameters); name the blocks, e.g. blocks=['re:encoder\\.layer\\.\\d+']")
    return best[3]


# -- measuring and planning -------------------------------------------------------------


def profile_checkpointing(
    model: nn.Module,
    example_batch: Batch,
    loss_fn: LossFn,
    config: CheckpointConfig | None = None,
) -> CheckpointProfile:
    """Measure what checkpointing each block of ``model`` saves and costs.

    Runs ``config.repeats + 1`` timed steps, one step followed storage by storage, and
    one step with every block checkpointed. The model comes back as it was: its
    ``.grad`` tensors, the RNG state and its forward are restored.

    Args:
        model: the model, in the mode it will train in (dropout on or off).
        example_batch: one training batch as the model takes it: a tensor, a tuple of
            positional inputs or a dict of keyword inputs, on the model's device.
        loss_fn: maps the model's output to a scalar loss, e.g.
            ``lambda out: out.loss`` or ``lambda out: out.last_hidden_state.pow(2).mean()``.
        config: blocks, autocast and repeats (the budget is not used here).
    """
    config = config or CheckpointConfig()
    names = resolve_blocks(model, config.blocks)
    device = _device(model)
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        _loss(model, example_batch, loss_fn).backward()

    with _preserved(model, device):
        with _applied(model, [], config.autocast):
            order, fwd_seconds, step_seconds = _time_steps(model, names, step, config.repeats, device)
            blocks, phases, tracked_max = _trace(model, order, example_batch, loss_fn, fwd_seconds)
            # The traced step was followed by storage tracking already; the CUDA allocator
            # also sees workspaces and rounding, so on CUDA its peak is the one reported.
            none = measure_activation_peak(step, params, device) if device.type == "cuda" else None
        max_peak = none.peak_bytes if none is not None else tracked_max
        profile = CheckpointProfile(
            blocks=blocks, autocast=config.autocast, device=str(device), inputs=_shapes(example_batch),
            step_seconds=step_seconds, max_peak_bytes=max_peak, min_peak_bytes=0, min_blocks=[],
            measure_method=none.method if none is not None else "storages", phases=phases,
            offset_bytes=max_peak - tracked_max,
        )
        # Usually every block; but recomputing the last block can cost more than it saves.
        lowest = profile.lowest()
        with _applied(model, lowest, config.autocast):
            profile.min_peak_bytes = measure_activation_peak(step, params, device).peak_bytes
        profile.min_blocks = lowest
    return profile


def plan_checkpointing(
    model: nn.Module,
    example_batch: Batch,
    loss_fn: LossFn,
    budget: int | str | None = None,
    *,
    config: CheckpointConfig | None = None,
    profile: CheckpointProfile | None = None,
) -> CheckpointPlan:
    """Choose the blocks to checkpoint so that a training step's activations fit ``budget``.

    Among the choices predicted to fit, it takes the one with the least recompute time,
    then (with ``config.verify``) measures it and adds blocks while the measurement is
    over the budget.

    Args:
        model, example_batch, loss_fn: as for :func:`profile_checkpointing`.
        budget: bytes or text such as ``"1.5GiB"``; overrides ``config.budget``. None
            (and no budget in the config) checkpoints every block.
        config: blocks, autocast, strategy, verify, repeats.
        profile: reuse measurements from :func:`profile_checkpointing` (taken with the
            same blocks and autocast) to plan several budgets without measuring again.

    Raises:
        ConfigError: the budget is below the least peak checkpointing can reach; the
            message says what that minimum is and what would lower it.
    """
    config = config or CheckpointConfig()
    if budget is not None:
        config = CheckpointConfig.model_validate({**config.model_dump(), "budget": budget})
    if config.policy != "full":
        raise ConfigError(f"policy={config.policy!r}: planning to a budget predicts full recomputation; plan with "
                          "policy='full', or checkpoint blocks with policy='selective' and no budget")
    if profile is None:
        profile = profile_checkpointing(model, example_batch, loss_fn, config)
    elif profile.autocast != config.autocast:
        raise ConfigError(f"the profile was measured with autocast={profile.autocast!r} but the config asks for "
                          f"{config.autocast!r}; profile again with this config")
    if config.budget is None:
        chosen = profile.names
        measured = profile.min_peak_bytes if profile.min_blocks == chosen else None
        return CheckpointPlan(profile, None, chosen, profile.predict_peak(chosen), measured,
                              profile.predict_extra_seconds(chosen))
    budget_bytes = int(config.budget)
    if budget_bytes < profile.min_peak_bytes:
        raise ConfigError(_below_minimum(budget_bytes, profile))
    if budget_bytes >= profile.max_peak_bytes:
        return CheckpointPlan(profile, budget_bytes, [], profile.max_peak_bytes, profile.max_peak_bytes, 0.0)

    target = budget_bytes
    chosen = profile.choose(target, config.strategy, best_effort=True)
    checks: list[dict[str, Any]] = []
    measured = None
    if config.verify:
        device = _device(model)
        params = [p for p in model.parameters() if p.requires_grad]

        def step() -> None:
            _loss(model, example_batch, loss_fn).backward()

        tried: list[list[str]] = []
        while True:
            if chosen == profile.min_blocks:  # measured already, and within any valid budget
                measured = profile.min_peak_bytes
                break
            with _preserved(model, device), _applied(model, chosen, config.autocast):
                measured = measure_activation_peak(step, params, device).peak_bytes
            predicted = profile.predict_peak(chosen)
            checks.append({"blocks": chosen, "predicted_peak_bytes": predicted, "measured_peak_bytes": measured})
            tried.append(chosen)
            if measured <= budget_bytes:
                break
            # The prediction was short by (measured - predicted): ask for that much less.
            target = min(target - 1, budget_bytes - (measured - predicted))
            chosen = profile.choose(target, config.strategy, best_effort=True)
            if chosen in tried:
                chosen = profile.min_blocks
    return CheckpointPlan(profile, budget_bytes, chosen, profile.predict_peak(chosen), measured,
                          profile.predict_extra_seconds(chosen), checks)


def _below_minimum(budget: int, profile: CheckpointProfile) -> str:
    shapes = ", ".join(f"{k} {v}" for k, v in profile.inputs.items()) or "the example batch"
    ways = [f"a smaller batch or shorter sequences (activations grow with both; the example batch is {shapes})"]
    if profile.autocast == "none":
        ways.append("autocast='bf16' (matmul inputs are saved in 2 bytes instead of 4, but bf16 copies of the "
                    "weights live while the forward runs, so it lowers the peak only when activations outweigh "
                    "weights: profile with it to see)")
    where = ""
    if profile.phases:
        ph = profile.peak_phase(profile.min_blocks)
        where = f" That peak falls in {ph.where}"
        if ph.before == 0 and ph.kind in ("before", "after backward"):
            # Nothing a block keeps is live there: more checkpointing cannot help.
            where += (", where no block's activations are live, so checkpointing more cannot lower it (in a "
                      "language model this is often the dense gradient of the embedding table, which grows with "
                      "the vocabulary, not the batch).")
        else:
            where += "."
            ways.append("more or finer blocks: checkpointing the parts of each layer (e.g. '...layer.N.attention' "
                        "and '...layer.N.intermediate') recomputes less at once, and blocks outside the repeated "
                        "layers free what the embeddings and head hold")
    return (f"budget: {_fmt(budget)} is below {_fmt(profile.min_peak_bytes)}, the least peak activation memory "
            f"checkpointing can reach here ({len(profile.min_blocks)} of {len(profile.blocks)} blocks checkpointed; "
            f"{_fmt(profile.max_peak_bytes)} with none).{where} To lower the minimum: " + "; ".join(ways) + ".")


def _time_steps(
    model: nn.Module, names: list[str], step: Callable[[], None], repeats: int, device: torch.device
) -> tuple[list[str], dict[str, float], float]:
    """Block execution order, each block's median forward time, and the median step time."""
    order: list[str] = []
    starts: dict[str, float] = {}
    runs: dict[str, list[float]] = {n: [] for n in names}
    calls: dict[str, int] = dict.fromkeys(names, 0)
    recording = [False]

    def pre(name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, _a: Any) -> None:
            if not recording[0]:
                return
            if name not in order:
                order.append(name)
            calls[name] += 1
            _sync(device)
            starts[name] = time.perf_counter()
        return hook

    def post(name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, _a: Any, _o: Any) -> None:
            if recording[0]:
                _sync(device)
                runs[name].append(time.perf_counter() - starts[name])
        return hook

    handles = []
    for n in names:
        m = model.get_submodule(n)
        handles += [m.register_forward_pre_hook(pre(n)), m.register_forward_hook(post(n))]
    try:
        step()  # warm-up: first calls allocate caches and pick kernels
        _zero_grads(model)
        step_times = []
        recording[0] = True
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            step()
            _sync(device)
            step_times.append(time.perf_counter() - t0)
            _zero_grads(model)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if calls[n] == 0]
    if missing:
        raise ConfigError(f"blocks: {missing} did not run in the example step; choose modules the forward calls")
    repeated = [n for n in names if calls[n] != repeats]
    if repeated:
        counts = ", ".join(f"{n} {calls[n]} times" for n in repeated)
        raise ConfigError(f"blocks: {repeated} do not run exactly once per step ({counts} in {repeats} steps: "
                          "shared weights, or a condition?); the planner needs "
                          "blocks that run once: choose the modules that call them, or checkpoint_ without a budget")
    return order, {n: statistics.median(runs[n]) for n in names}, statistics.median(step_times)


def _trace(
    model: nn.Module, order: list[str], batch: Batch, loss_fn: LossFn, fwd_seconds: dict[str, float]
) -> tuple[list[BlockProfile], list[_Phase], int]:
    """Follow live storages through one step and cut it into phases at block boundaries."""
    index = {n: i for i, n in enumerate(order)}
    tracker = LiveStorageCounter()
    start_live: dict[int, int] = {}
    start_count: dict[int, int] = {}
    fwd_phase: dict[int, Any] = {}
    retained: dict[int, int] = {}
    out_bytes: dict[int, int] = {}
    inputs: dict[int, list[tuple[weakref.ref, int]]] = {}
    bwd_phase: dict[int, Any] = {}
    fired: set[tuple[str, int]] = set()

    def once(kind: str, i: int, fn: Callable[[], None]) -> Callable[[torch.Tensor], None]:
        def hook(_grad: torch.Tensor) -> None:
            if (kind, i) not in fired:
                fired.add((kind, i))
                fn()
        return hook

    def pre(i: int) -> Callable[..., None]:
        def hook(_m: nn.Module, args: Any, kwargs: Any) -> None:
            start_live[i] = tracker.live_bytes
            start_count[i] = tracker.counter
            fwd_phase[i] = tracker.mark(("forward", i))
            tensors = _flat_tensors((args, kwargs))
            seen: dict[int, tuple[weakref.ref, int]] = {}
            for t in tensors:
                st = t.untyped_storage()
                seen.setdefault(id(st), (weakref.ref(st), st.nbytes()))
            inputs[i] = list(seen.values())
            for t in tensors:
                if t.requires_grad:
                    # Its gradient is complete once the block's backward is done.
                    t.register_hook(once("after", i, lambda: tracker.mark(("after backward", i))))
        return hook

    def post(i: int) -> Callable[..., None]:
        def hook(_m: nn.Module, _a: Any, _kw: Any, output: Any) -> None:
            retained[i] = tracker.bytes_born_since(start_count[i])
            outs: dict[int, int] = {}
            for t in _flat_tensors(output):
                st = t.untyped_storage()
                if tracker.born_after(st, start_count[i]):
                    outs[id(st)] = st.nbytes()
            out_bytes[i] = sum(outs.values())
            tracker.mark(("between", i + 1))

            def begin_backward() -> None:
                bwd_phase[i] = tracker.mark(("backward", i))

            for t in _flat_tensors(output):
                if t.requires_grad:
                    t.register_hook(once("backward", i, begin_backward))
        return hook

    handles = []
    for n in order:
        m = model.get_submodule(n)
        handles += [m.register_forward_pre_hook(pre(index[n]), with_kwargs=True),
                    m.register_forward_hook(post(index[n]), with_kwargs=True)]
    params = [p for p in model.parameters() if p.requires_grad]
    freed_inputs: dict[int, int] = {}
    try:
        with _preserved(model, _device(model)), preallocated_grads(params), tracker:
            tracker.mark(("before", 0))
            loss = _loss(model, batch, loss_fn)
            # Inputs the baseline frees before the backward would be kept by a checkpoint.
            for i, refs in inputs.items():
                freed_inputs[i] = sum(b for ref, b in refs if ref() is None)
            loss.backward()
            del loss
    finally:
        for h in handles:
            h.remove()

    n = len(order)
    blocks = []
    for i, name in enumerate(order):
        boundary = freed_inputs.get(i, 0)
        saved = retained[i] - out_bytes[i]
        saving = saved - boundary
        fwd_peak_excess = fwd_phase[i].peak_bytes - start_live[i]
        bwd = bwd_phase.get(i)
        bwd_excess = bwd.peak_bytes - bwd.start_bytes if bwd is not None else 0
        # When checkpointed, its backward holds the kept inputs on top of what it held
        # before, and its recompute may go higher than the backward itself did.
        extra = max(boundary, fwd_peak_excess - saving - bwd_excess)
        blocks.append(BlockProfile(name, saved, out_bytes[i], boundary, saving, extra, fwd_seconds[name]))
    phases = []
    for ph in tracker.phases:
        kind, i = ph.label
        before = {"before": 0, "forward": i, "between": i, "backward": i, "after backward": i}[kind]
        where = {"before": "the step before the first block",
                 "forward": f"the forward of {order[min(i, n - 1)]}",
                 "between": f"the step after {order[i - 1]}" if i < n else "the step after the last block "
                            "(head, loss and their backward)",
                 "backward": f"the backward of {order[min(i, n - 1)]}",
                 "after backward": f"the backward after {order[min(i, n - 1)]}"}[kind]
        phases.append(_Phase(ph.peak_bytes, min(before, n), i if kind == "backward" else -1, kind, where))
    return blocks, phases, tracker.peak_bytes


# -- helpers ----------------------------------------------------------------------------


def _loss(model: nn.Module, batch: Batch, loss_fn: LossFn) -> torch.Tensor:
    loss = loss_fn(call_with(model, batch))
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
        got = f"a tensor of shape {list(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise SlimkitError(f"loss_fn must return a scalar tensor that depends on the model's parameters; got {got}"
                           + (" that needs no grad" if isinstance(loss, torch.Tensor) and loss.numel() == 1 else ""))
    return loss.float()


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _flat_tensors(obj: Any) -> list[torch.Tensor]:
    from torch.utils._pytree import tree_flatten

    if hasattr(obj, "to_tuple") and not isinstance(obj, torch.Tensor):  # HF ModelOutput
        obj = obj.to_tuple()
    return [t for t in tree_flatten(obj)[0] if isinstance(t, torch.Tensor) and t.layout == torch.strided]


def _zero_grads(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


@contextmanager
def _preserved(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Steps run inside leave the model's gradients and the RNG streams as they were."""
    grads = [(p, p.grad) for p in model.parameters()]
    devices = [device] if device.type == "cuda" else []
    for p, _ in grads:  # else backward would add into the caller's gradients in place
        p.grad = None
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        for p, g in grads:
            p.grad = g


def _shapes(batch: Batch) -> dict[str, list[int]]:
    if isinstance(batch, torch.Tensor):
        return {"input": list(batch.shape)}
    items = batch.items() if isinstance(batch, Mapping) else enumerate(batch)
    return {str(k): list(v.shape) for k, v in items if isinstance(v, torch.Tensor)}


def _fmt(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"
