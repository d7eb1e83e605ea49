"""Planning to a budget: :func:`plan_checkpointing` chooses the blocks from a profile,
measures the choice and adds blocks while it is over; :class:`CheckpointPlan` is the
result, and the message for a budget below the reachable minimum says what would help."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from slimkit.errors import ConfigError
from slimkit.memory.checkpoint.config import CheckpointConfig
from slimkit.memory.checkpoint.cost_model import CheckpointProfile
from slimkit.memory.checkpoint.profiling import profile_checkpointing
from slimkit.memory.checkpoint.steps import Batch, LossFn, _device, _loss, _preserved
from slimkit.memory.checkpoint.wrap import _applied
from slimkit.memory.peak import measure_activation_peak


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


def _fmt(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"
