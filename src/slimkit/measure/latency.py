"""Latency and throughput: warm-up, interleaved rounds, medians and spread, ratios per round."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np


def measure_latency(
    calls: dict[str, Callable[[], object]],
    baseline: str,
    batch_size: int,
    rounds: int = 7,
    iters: int = 10,
    warmup: int = 3,
    progress: Callable[[], None] | None = None,
    settle_s: float = 0.05,
    sleep: Callable[[float], None] | None = None,
) -> dict[str, dict[str, float]]:
    """Time every call in ``calls`` fairly against ``baseline``.

    Variants are interleaved within each round (the order rotates every round), so drift
    in machine speed hits them all alike; each variant's ratio to the baseline is taken
    within a round and the median over rounds is reported.

    Before each variant's turn the harness pauses ``settle_s`` and makes one untimed call:
    runtimes keep their worker threads spinning for a while after a call, and in one
    process those threads would otherwise steal cores from the next variant; the untimed
    call wakes the variant's own threads and refills its caches.

    Returns:
        Per variant: ``median_ms``, ``p10_ms``, ``p90_ms`` over all timed calls,
        ``ratio_to_baseline``, ``throughput_per_s`` (items per second at this batch) and
        ``round_ms``, the median of each round, for ratios between any two variants.
    """
    names = list(calls)
    for name in names:
        for _ in range(warmup):
            calls[name]()
    samples: dict[str, list[float]] = {n: [] for n in names}
    round_medians: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            (sleep or time.sleep)(settle_s)
            calls[name]()
            times = []
            for _ in range(iters):
                t0 = time.perf_counter()
                calls[name]()
                times.append(time.perf_counter() - t0)
            samples[name].extend(times)
            round_medians[name].append(float(np.median(times)))
        if progress:
            progress()
    out = {}
    base = np.array(round_medians[baseline])
    for name in names:
        t = np.array(samples[name]) * 1000.0
        med = float(np.median(t))
        out[name] = {
            "median_ms": med,
            "p10_ms": float(np.percentile(t, 10)),
            "p90_ms": float(np.percentile(t, 90)),
            "ratio_to_baseline": float(np.median(np.array(round_medians[name]) / base)),
            "throughput_per_s": batch_size / (med / 1000.0),
            "round_ms": [x * 1000.0 for x in round_medians[name]],
        }
    return out


def paired_ratio(a: dict[str, float], b: dict[str, float]) -> float:
    """Median over rounds of ``a``'s time divided by ``b``'s, both from one measurement."""
    return float(np.median(np.array(a["round_ms"]) / np.array(b["round_ms"])))
