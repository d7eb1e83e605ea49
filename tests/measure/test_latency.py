"""measure_latency: structure, arithmetic and interleaving, timed with a fake clock."""

from __future__ import annotations

import types

import pytest

from slimkit.measure import latency


class FakeClock:
    """A clock that only moves when a fake call says how long it took."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = FakeClock()
    # The settle pause is not timed; the fake clock skips it so the tests do not wait.
    monkeypatch.setattr(latency, "time", types.SimpleNamespace(perf_counter=c.perf_counter, sleep=lambda s: None))
    return c


def fake_calls(clock: FakeClock, durations_ms: dict[str, float], log: list[str]):
    def make(name, ms):
        def call():
            log.append(name)
            clock.now += ms / 1000.0

        return call

    return {name: make(name, ms) for name, ms in durations_ms.items()}


def test_statistics_from_known_durations(clock):
    log: list[str] = []
    calls = fake_calls(clock, {"fp32": 2.0, "int8": 1.0, "slow": 8.0}, log)
    out = latency.measure_latency(calls, "fp32", batch_size=8, rounds=3, iters=4, warmup=2)
    assert list(out) == ["fp32", "int8", "slow"]
    for stats in out.values():
        assert set(stats) == {"median_ms", "p10_ms", "p90_ms", "ratio_to_baseline", "throughput_per_s", "round_ms"}
        assert len(stats["round_ms"]) == 3
    assert out["fp32"]["median_ms"] == pytest.approx(2.0)
    assert out["int8"]["median_ms"] == pytest.approx(1.0)
    assert out["slow"]["p10_ms"] == pytest.approx(8.0) and out["slow"]["p90_ms"] == pytest.approx(8.0)
    assert out["fp32"]["ratio_to_baseline"] == 1.0
    assert out["int8"]["ratio_to_baseline"] == pytest.approx(0.5)
    assert out["slow"]["ratio_to_baseline"] == pytest.approx(4.0)
    assert out["int8"]["throughput_per_s"] == pytest.approx(8 / 0.001)
    for stats in out.values():
        assert stats["throughput_per_s"] == pytest.approx(8 / (stats["median_ms"] / 1000))
    assert out["slow"]["round_ms"] == pytest.approx([8.0, 8.0, 8.0])
    assert latency.paired_ratio(out["slow"], out["int8"]) == pytest.approx(8.0)
    assert latency.paired_ratio(out["int8"], out["int8"]) == 1.0


def test_calls_warmup_then_rounds_times_iters(clock):
    log: list[str] = []
    calls = fake_calls(clock, {"a": 1.0, "b": 1.0}, log)
    latency.measure_latency(calls, "a", batch_size=1, rounds=5, iters=3, warmup=2)
    assert log[:4] == ["a", "a", "b", "b"]  # warm-up first
    assert log.count("a") == log.count("b") == 2 + 5 * (1 + 3)  # one untimed call per turn


def test_order_rotates_every_round(clock):
    log: list[str] = []
    calls = fake_calls(clock, {"a": 1.0, "b": 2.0, "c": 3.0}, log)
    latency.measure_latency(calls, "a", batch_size=1, rounds=4, iters=2, warmup=0)
    blocks = [log[i] for i in range(0, len(log), 3)]  # one entry per (round, variant)
    assert all(log[i] == log[i + 1] == log[i + 2] for i in range(0, len(log), 3))  # back to back
    assert blocks == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]


def test_ratio_is_the_median_of_per_round_ratios(clock):
    # The machine slows down 10x after the first round: per-round ratios stay at 0.5.
    speed = {"factor": 1.0}
    rounds_seen = {"n": 0}

    def timed(ms):
        def call():
            clock.now += ms * speed["factor"] / 1000.0

        return call

    def progress():
        rounds_seen["n"] += 1
        speed["factor"] = 10.0

    calls = {"base": timed(2.0), "fast": timed(1.0)}
    out = latency.measure_latency(calls, "base", batch_size=1, rounds=3, iters=2, warmup=0, progress=progress)
    assert rounds_seen["n"] == 3
    assert out["fast"]["ratio_to_baseline"] == pytest.approx(0.5)
    assert out["base"]["ratio_to_baseline"] == 1.0
    assert out["base"]["median_ms"] == pytest.approx(20.0)
    assert out["base"]["round_ms"] == pytest.approx([2.0, 20.0, 20.0])
    assert out["fast"]["round_ms"] == pytest.approx([1.0, 10.0, 10.0])
    assert latency.paired_ratio(out["base"], out["fast"]) == pytest.approx(2.0)


def test_percentiles(clock):
    # The first call of the turn is untimed: its 100 ms must not show in the statistics.
    durations = iter([100.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0])

    def call():
        clock.now += next(durations) / 1000.0

    out = latency.measure_latency({"x": call}, "x", batch_size=2, rounds=1, iters=11, warmup=0)
    assert out["x"]["median_ms"] == pytest.approx(6.0)
    assert out["x"]["p10_ms"] == pytest.approx(2.0)
    assert out["x"]["p90_ms"] == pytest.approx(10.0)
    assert out["x"]["throughput_per_s"] == pytest.approx(2 / 0.006)


def test_each_turn_starts_with_a_settle_pause(clock):
    log: list[str] = []
    pauses: list[float] = []

    def sleep(s):
        log.append("pause")
        pauses.append(s)

    calls = fake_calls(clock, {"a": 1.0, "b": 1.0}, log)
    latency.measure_latency(calls, "a", batch_size=1, rounds=2, iters=2, warmup=0, settle_s=0.25, sleep=sleep)
    assert log == ["pause", "a", "a", "a", "pause", "b", "b", "b", "pause", "b", "b", "b", "pause", "a", "a", "a"]
    assert pauses == [0.25] * 4


def test_unknown_baseline_is_an_error(clock):
    log: list[str] = []
    with pytest.raises(KeyError):
        latency.measure_latency(fake_calls(clock, {"a": 1.0}, log), "fp32", batch_size=1, rounds=1, iters=1, warmup=0)


def test_real_clock_structure():
    # With the real clock only the structure is checked, never a timing threshold.
    out = latency.measure_latency({"x": lambda: sum(range(100))}, "x", batch_size=4, rounds=2, iters=3, warmup=1)
    s = out["x"]
    assert s["ratio_to_baseline"] == 1.0
    assert 0 < s["p10_ms"] <= s["median_ms"] <= s["p90_ms"]
    assert s["throughput_per_s"] == pytest.approx(4 / (s["median_ms"] / 1000))
