"""Device profiles: the shipped ones load, and the roofline estimate's arithmetic."""

from __future__ import annotations

import pytest

from slimkit.deploy.devices import (
    DeviceProfile,
    estimate_on,
    estimates_for,
    load_profile,
    profile_names,
)
from slimkit.errors import ConfigError


def test_the_shipped_profiles_load_with_their_sources():
    assert profile_names() == ["jetson-orin-nx-16gb", "raspberry-pi-5", "x86-server-core"]
    for name in profile_names():
        p = load_profile(name)
        assert p.name == name and p.source and p.peak_ops["fp32"] > 0 and p.bandwidth_bytes_per_s > 0
    pi = load_profile("raspberry-pi-5")
    assert pi.peak_ops == {"fp32": 153.6e9, "fp16": 307.2e9, "int8": 614.4e9}  # 4 A76 cores at 2.4 GHz


DEVICE = DeviceProfile(name="toy", memory_bytes=1e9, peak_ops={"fp32": 1e9, "int8": 4e9},
                       bandwidth_bytes_per_s=1e8, power_watts=2.0, source="test")


def test_the_roofline_takes_the_longer_of_arithmetic_and_memory():
    # 1e8 MACs = 2e8 ops at half of 1e9/s: 0.4 s of arithmetic; 1e6 bytes at 1e8/s: 0.01 s.
    e = estimate_on(DEVICE, macs=100_000_000, bytes_moved=1_000_000)
    assert e["latency_ms"] == pytest.approx(400.0) and e["bound"] == "compute" and e["estimate"] is True
    assert e["energy_mj"] == pytest.approx(400.0 * 2.0)
    # All in int8: 4x the rate.
    assert estimate_on(DEVICE, 100_000_000, 1_000_000, int8_fraction=1.0)["latency_ms"] == pytest.approx(100.0)
    # fp16 the device lacks runs at the fp32 rate; memory-bound when the bytes dominate.
    assert estimate_on(DEVICE, 100_000_000, 1_000_000, fp16_fraction=1.0)["latency_ms"] == pytest.approx(400.0)
    m = estimate_on(DEVICE, 1_000, 100_000_000)
    assert m["bound"] == "memory" and m["latency_ms"] == pytest.approx(1000.0)


def test_estimates_come_from_a_runs_energy_record():
    record = {"macs": 300_000_000, "int8_mac_fraction": 0.9, "bytes_moved": 3_500_000}
    pi, core = load_profile("raspberry-pi-5"), load_profile("x86-server-core")
    a, b = estimates_for(record, [pi, core])
    assert a["device"] == "raspberry-pi-5" and b["device"] == "x86-server-core"
    assert a["latency_ms"] == pytest.approx(
        (2 * 3e8 * 0.9 / (614.4e9 * 0.5) + 2 * 3e8 * 0.1 / (153.6e9 * 0.5)) * 1e3)


def test_a_bad_profile_is_refused_by_name(tmp_path):
    with pytest.raises(ConfigError, match="device profile 'jetson-nano': no such profile; shipped ones are"):
        load_profile("jetson-nano")
    bad = tmp_path / "mine.yaml"
    bad.write_text("name: mine\nmemory_bytes: -1\npeak_ops: {fp32: 1e9}\nbandwidth_bytes_per_s: 1e9\n"
                   "power_watts: 1\nsource: me\n")
    with pytest.raises(ConfigError, match="memory_bytes"):
        load_profile(bad)
