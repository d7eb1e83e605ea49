"""The analytical energy estimate, MAC counting and the RAPL reader."""

from __future__ import annotations

import pytest
import torch
from tiny_models import inputs, mlp

from slimkit.measure import energy
from slimkit.quantize import DynamicInt8Config, quantize_
from slimkit.quantize.dynamic import DynamicInt8Linear

FP32, FP16, INT8 = 4.6, 1.5, 0.3  # pJ per MAC
DRAM = 243.75  # pJ per byte


def test_prices_are_the_documented_ones():
    assert energy.PJ_PER_MAC == pytest.approx({"fp32": FP32, "fp16": FP16, "int8": INT8})
    assert energy.PJ_PER_DRAM_BYTE == DRAM
    assert energy.PJ_PER_MAC["int8"] < energy.PJ_PER_MAC["fp16"] < energy.PJ_PER_MAC["fp32"]


def test_all_fp32():
    est = energy.estimate(1_000_000, {"a": 600_000}, {}, weight_bytes=1000)
    assert est["estimate_mj"] == pytest.approx((1_000_000 * FP32 + 1000 * DRAM) * 1e-9)
    assert est["macs"] == 1_000_000
    assert est["int8_mac_fraction"] == 0.0
    assert est["bytes_moved"] == 1000
    assert est["source"] == energy.SOURCE


def test_low_precision_layers_are_priced_lower():
    per_layer = {
        "encoder.layer.0.attention.self.query": 100,
        "encoder.layer.0.attention.self.key": 200,
        "encoder.layer.0.output.dense": 300,
        "encoder.layer.10.output.dense": 50,
        "pooler.dense": 150,
    }
    low = {
        "encoder.layer.0.attention.self": "int8",  # a prefix: query and key
        "encoder.layer.0.output.dense": "fp16",  # an exact name
        "encoder.layer.1": "int8",  # must not match encoder.layer.10
    }
    est = energy.estimate(1000, per_layer, low, weight_bytes=0)
    int8, fp16 = 300, 300
    fp32 = 1000 - int8 - fp16
    assert est["estimate_mj"] == pytest.approx((fp32 * FP32 + fp16 * FP16 + int8 * INT8) * 1e-9)
    assert est["int8_mac_fraction"] == pytest.approx(0.3)
    base = energy.estimate(1000, per_layer, {}, weight_bytes=0)
    assert est["estimate_mj"] < base["estimate_mj"]


def test_prefix_must_end_at_a_dot():
    est = energy.estimate(100, {"enc": 10, "encoder.x": 90}, {"enc": "int8"}, 0)
    assert est["int8_mac_fraction"] == pytest.approx(0.1)


def test_int8_everywhere_is_cheaper_than_fp16_everywhere():
    per_layer = {"a": 500, "b": 500}
    i8 = energy.estimate(1000, per_layer, {"a": "int8", "b": "int8"}, 100)
    f16 = energy.estimate(1000, per_layer, {"a": "fp16", "b": "fp16"}, 100)
    f32 = energy.estimate(1000, per_layer, {}, 100)
    assert i8["estimate_mj"] < f16["estimate_mj"] < f32["estimate_mj"]
    assert i8["int8_mac_fraction"] == 1.0
    assert i8["estimate_mj"] == pytest.approx((1000 * INT8 + 100 * DRAM) * 1e-9)


def test_zero_macs():
    est = energy.estimate(0, {}, {}, 8)
    assert est["int8_mac_fraction"] == 0.0
    assert est["estimate_mj"] == pytest.approx(8 * DRAM * 1e-9)


def test_linear_macs_of_the_tiny_mlp():
    module, _ = mlp()
    per_layer, total = energy.linear_macs(module, (inputs(4),))
    assert per_layer == {"0": 4 * 64 * 128, "2": 4 * 128 * 32}
    assert total == 4 * 64 * 128 + 4 * 128 * 32
    assert not module[0]._forward_hooks  # hooks are removed


def test_linear_macs_of_quantized_layers():
    module, _ = mlp()
    quantize_(module, DynamicInt8Config())
    per_layer, _ = energy.linear_macs(module, (inputs(3),), (DynamicInt8Linear,))
    assert per_layer == {"0": 3 * 64 * 128, "2": 3 * 128 * 32}


def test_linear_macs_removes_hooks_when_forward_fails():
    module, _ = mlp()
    with pytest.raises(RuntimeError):
        energy.linear_macs(module, (torch.zeros(2, 5),))
    assert not module[0]._forward_hooks and not module[2]._forward_hooks


def test_measured_energy_without_rapl(monkeypatch, tmp_path):
    monkeypatch.setattr(energy, "RAPL", tmp_path / "missing")
    assert energy.measured_energy(lambda: None, seconds=0.01) is None


def test_measured_energy_from_a_fake_counter(monkeypatch, tmp_path):
    counter = tmp_path / "energy_uj"
    counter.write_text("5000\n")
    monkeypatch.setattr(energy, "RAPL", counter)

    def call():  # every inference costs 2500 uJ = 2.5 mJ
        counter.write_text(str(int(counter.read_text()) + 2500))

    out = energy.measured_energy(call, seconds=0.01)
    assert out["mj_per_inference"] == pytest.approx(2.5)
    assert "RAPL" in out["counter"]


def test_measured_energy_counter_wrap(monkeypatch, tmp_path):
    counter = tmp_path / "energy_uj"
    counter.write_text("5000")
    monkeypatch.setattr(energy, "RAPL", counter)
    assert energy.measured_energy(lambda: counter.write_text("10"), seconds=0.01) is None


def test_weight_bytes_read_counts_only_the_gathered_embedding_rows():
    tables = [("emb.word", 1000 * 8, 8), ("emb.pos", 64 * 8, 8)]
    file_bytes = 4 * (1000 * 8 + 64 * 8) + 5000  # fp32 tables plus 5000 bytes of other weights
    fp32 = energy.weight_bytes_read(file_bytes, tables, [], tokens=16)
    assert fp32 == 5000 + 2 * 16 * 8 * 4
    int8_file = (1000 * 8 + 64 * 8) + 5000
    int8 = energy.weight_bytes_read(int8_file, tables, ["emb"], tokens=16)
    assert int8 == 5000 + 2 * 16 * 8
