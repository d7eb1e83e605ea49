"""The profile and its cost model: what each block costs and saves
(:class:`BlockProfile`), and :class:`CheckpointProfile`, which predicts the peak and time of
any choice of blocks and chooses the cheapest one that meets a budget (exactly, or greedily)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from slimkit.errors import ConfigError, LayerSelectionError

EXACT_MAX_BLOCKS = 16  # 2^16 choices are scored at once with numpy; beyond that, greedy



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
