"""Arena planning on random lifetimes: never two live tensors in the same bytes."""

import random

import pytest

from slimkit.memory.planner import (
    STRATEGIES,
    MemoryPlan,
    PlanError,
    TensorLife,
    aligned,
    breadths,
    lower_bound,
    no_reuse_bytes,
    plan_memory,
    validate_plan,
)


def random_tensors(seed: int, n: int = 60, steps: int = 40) -> list[TensorLife]:
    """Lifetimes like a network's: mostly short, some long (residuals), sizes over 5 decades."""
    r = random.Random(seed)
    out = []
    for i in range(n):
        first = r.randrange(steps)
        span = r.choice([0, 1, 1, 2, 3, r.randrange(steps)])
        size = r.choice([1, 63, 64, 100, 4096, r.randrange(1, 1 << 20), r.randrange(1, 1 << 14)])
        out.append(TensorLife(size, first, min(steps - 1, first + span), f"t{i}"))
    return out


def overlaps(tensors, offsets) -> list[tuple[int, int]]:
    """Brute force, independent of the module's validator."""
    bad = []
    for i, a in enumerate(tensors):
        for j in range(i + 1, len(tensors)):
            b = tensors[j]
            alive_together = not (a.last < b.first or b.last < a.first)
            share_bytes = offsets[i] < offsets[j] + b.size and offsets[j] < offsets[i] + a.size
            if alive_together and share_bytes and a.size and b.size:
                bad.append((i, j))
    return bad


@pytest.mark.parametrize("strategy", ["auto", *STRATEGIES])
@pytest.mark.parametrize("alignment", [1, 64])
def test_random_lifetimes_never_overlap(strategy, alignment):
    for seed in range(150):
        tensors = random_tensors(seed)
        plan = plan_memory(tensors, alignment=alignment, strategy=strategy)
        assert overlaps(tensors, plan.offsets) == [], f"seed {seed}"
        assert all(o % alignment == 0 for o in plan.offsets)
        assert all(o + t.size <= plan.arena_bytes for o, t in zip(plan.offsets, tensors, strict=True))
        assert plan.lower_bound <= plan.arena_bytes <= plan.no_reuse_bytes, f"seed {seed}"
        assert plan.lower_bound == lower_bound(tensors, alignment)


def test_auto_keeps_the_smallest_and_beats_one_strategy_alone():
    ratios, wins = [], set()
    for seed in range(150):
        plan = plan_memory(random_tensors(seed))
        assert plan.arena_bytes == min(plan.tried.values())
        assert plan.tried[plan.strategy] == plan.arena_bytes and set(plan.tried) == set(STRATEGIES)
        wins |= {s for s, v in plan.tried.items() if v == plan.arena_bytes}
        if plan.arena_bytes < plan.tried["greedy_by_size"]:
            wins.add("beats_greedy_by_size")
        ratios.append(plan.ratio_to_lower_bound)
    # Every strategy is the best somewhere, and picking per graph beats greedy-by-size alone.
    assert set(STRATEGIES) | {"beats_greedy_by_size"} <= wins
    assert max(ratios) < 1.25 and sum(ratios) / len(ratios) < 1.01


def test_chain_with_residual_reaches_the_lower_bound():
    # x -> a -> b -> (x + b): x lives across the block, as a residual does.
    tensors = [TensorLife(1000, 0, 3, "x"), TensorLife(4000, 1, 2, "a"), TensorLife(1000, 2, 3, "b"),
               TensorLife(1000, 3, 4, "y")]
    plan = plan_memory(tensors, alignment=64)
    assert breadths(tensors, 64) == [1024, 5056, 6080, 3072, 1024]
    assert plan.lower_bound == 6080 and plan.arena_bytes == 6080
    assert plan.no_reuse_bytes == no_reuse_bytes(tensors, 64) == 1024 * 3 + 4032
    assert plan.to_dict()["ratio_to_lower_bound"] == 1.0


def test_validator_reports_every_overlap():
    tensors = [TensorLife(100, 0, 2, "a"), TensorLife(100, 1, 3, "b"), TensorLife(100, 2, 2, "c"),
               TensorLife(100, 5, 6, "d")]
    bad = MemoryPlan(offsets=(0, 64, 128, 0), arena_bytes=256, lower_bound=0, no_reuse_bytes=0,
                     strategy="hand", alignment=64)
    with pytest.raises(PlanError) as err:
        validate_plan(tensors, bad)
    text = str(err.value)
    assert "a (steps 0-2" in text and "b (steps 1-3" in text and "c (steps 2-2" in text
    assert "d (steps" not in text  # d shares a's bytes but not its steps
    # A tensor past the end of the arena, and a misaligned offset.
    with pytest.raises(PlanError, match="exceed the arena"):
        validate_plan([TensorLife(100, 0, 0)], MemoryPlan((0,), 64, 0, 0, "hand", 64))
    with pytest.raises(PlanError, match="multiple of 64"):
        validate_plan([TensorLife(10, 0, 0)], MemoryPlan((32,), 128, 0, 0, "hand", 64))


def test_edge_cases_and_bad_input():
    empty = plan_memory([])
    assert (empty.arena_bytes, empty.lower_bound, empty.ratio_to_lower_bound) == (0, 0, 1.0)
    zero = plan_memory([TensorLife(0, 0, 5), TensorLife(10, 0, 5)])
    assert zero.arena_bytes == 64
    assert aligned(65, 64) == 128 and aligned(64, 64) == 64
    with pytest.raises(ValueError, match="first <= last"):
        TensorLife(10, 3, 2, "x")
    with pytest.raises(ValueError, match="unknown planning strategy 'best'"):
        plan_memory([TensorLife(1, 0, 0)], strategy="best")
    with pytest.raises(ValueError, match="power of two"):
        plan_memory([TensorLife(1, 0, 0)], alignment=48)
