"""save -> load gives back the same module types, tensors and outputs, bit for bit."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import inputs

from slimkit.config import LayerSelector
from slimkit.errors import ModelLoadError
from slimkit.quantize import (
    DynamicInt8Config,
    Int4WeightOnlyConfig,
    Int8WeightOnlyConfig,
    LowPrecisionConfig,
    quantize_,
)
from slimkit.serialize import FORMAT, META, load, read_meta, save
from slimkit.zoo.models import LoadedModel, load_model

PLANS = {
    "fp32": ("mlp", []),
    "dynamic_int8_per_channel": ("mlp", [DynamicInt8Config()]),
    "dynamic_int8_per_tensor": ("mlp", [DynamicInt8Config(granularity="per_tensor")]),
    "int8_weight_only": ("mlp", [Int8WeightOnlyConfig()]),
    "int8_weight_only_embedding": ("embed_mlp", [Int8WeightOnlyConfig()]),
    "int8_weight_only_no_embedding": ("embed_mlp", [Int8WeightOnlyConfig(include_embeddings=False)]),
    "int4_weight_only_g64_fp16": ("mlp", [Int4WeightOnlyConfig()]),
    "int4_weight_only_g32_fp32": ("mlp", [Int4WeightOnlyConfig(group_size=32, scale_dtype="float32")]),
    "int4_weight_only_skips_ragged": ("ragged_mlp", [Int4WeightOnlyConfig(group_size=32)]),
    "low_precision_bf16_weights": ("mlp", [LowPrecisionConfig()]),
    "low_precision_fp16_weights": ("mlp", [LowPrecisionConfig(dtype="fp16")]),
    "low_precision_bf16_autocast": ("mlp", [LowPrecisionConfig(mode="autocast")]),
    "low_precision_fp16_autocast": ("mlp", [LowPrecisionConfig(dtype="fp16", mode="autocast")]),
    "chain_int4_then_dynamic": (
        "mlp",
        [
            Int4WeightOnlyConfig(layers=LayerSelector(targets=["0"])),
            DynamicInt8Config(),  # only "2" is still an nn.Linear
        ],
    ),
    "partial_dynamic_ignore": ("mlp", [DynamicInt8Config(layers=LayerSelector(ignore=["2"]))]),
}


def build(factory: str, configs) -> LoadedModel:
    model = load_model(f"tiny_models:{factory}")
    for cfg in configs:
        quantize_(model.module, cfg)
    return model


def outputs(model: LoadedModel) -> torch.Tensor:
    with torch.no_grad():
        return model.module(*model.example_inputs)


@pytest.mark.parametrize("plan", list(PLANS))
def test_save_load_round_trip_is_bit_exact(plan, tmp_path):
    factory, configs = PLANS[plan]
    model = build(factory, configs)
    before = outputs(model)  # also packs fbgemm weights before saving
    meta = save(model, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == sorted([META, "model.safetensors"])
    assert meta["framework"] == "torch" and meta["format"] == FORMAT
    assert meta["spec"] == {"kind": "callable", "ref": f"tiny_models:{factory}"}
    assert [t["config"] for t in meta["transforms"]] == [c.to_dict() for c in configs]
    assert read_meta(tmp_path / "m") == json.loads((tmp_path / "m" / META).read_text()) == meta

    loaded = load(tmp_path / "m")
    assert isinstance(loaded, LoadedModel)
    assert not loaded.module.training
    assert [type(m) for m in loaded.module.modules()] == [type(m) for m in model.module.modules()]
    sd, sd2 = model.module.state_dict(), loaded.module.state_dict()
    assert list(sd) == list(sd2)
    for k in sd:
        torch.testing.assert_close(sd2[k], sd[k], rtol=0, atol=0, msg=k)
    torch.testing.assert_close(outputs(loaded), before, rtol=0, atol=0)
    # The transforms are remembered, so the loaded model saves the same description.
    assert save(loaded, tmp_path / "again") == meta


def test_recorded_layers_are_the_ones_changed(tmp_path):
    model = build("ragged_mlp", [Int4WeightOnlyConfig(group_size=32)])
    meta = save(model, tmp_path)
    assert meta["transforms"][0]["layers"] == ["0", "4"]
    model = build("mlp", PLANS["chain_int4_then_dynamic"][1])
    meta = save(model, tmp_path)
    assert [t["layers"] for t in meta["transforms"]] == [["0"], ["2"]]


def test_loaded_weights_come_from_the_file_not_the_factory(tmp_path):
    model = build("mlp", [Int8WeightOnlyConfig()])
    with torch.no_grad():
        model.module[0].weight_int8.fill_(3)
    save(model, tmp_path)
    loaded = load(tmp_path)
    assert bool((loaded.module[0].weight_int8 == 3).all())


def test_missing_meta(tmp_path):
    with pytest.raises(ModelLoadError, match="no slimkit.json"):
        load(tmp_path)


def test_corrupt_meta(tmp_path):
    save(build("mlp", []), tmp_path)
    (tmp_path / META).write_text("{not json")
    with pytest.raises(ModelLoadError, match="corrupt JSON"):
        load(tmp_path)


def test_newer_format_version_is_refused(tmp_path):
    meta = save(build("mlp", []), tmp_path)
    (tmp_path / META).write_text(json.dumps(meta | {"format_version": 99}))
    with pytest.raises(ModelLoadError, match="upgrade slimkit"):
        load(tmp_path)


def test_missing_weights(tmp_path):
    save(build("mlp", []), tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="'model.safetensors' is missing"):
        load(tmp_path)


def test_corrupt_weights(tmp_path):
    save(build("mlp", []), tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match="cannot load the weights"):
        load(tmp_path)


def test_weights_not_matching_the_transforms(tmp_path):
    meta = save(build("mlp", [DynamicInt8Config()]), tmp_path)
    (tmp_path / META).write_text(json.dumps(meta | {"transforms": []}))
    with pytest.raises(ModelLoadError, match="does not match slimkit.json"):
        load(tmp_path)


def test_unimportable_spec(tmp_path):
    meta = save(build("mlp", []), tmp_path)
    (tmp_path / META).write_text(json.dumps(meta | {"spec": {"kind": "callable", "ref": "no_such_module_xyz:f"}}))
    with pytest.raises(ModelLoadError, match="cannot import 'no_such_module_xyz:f'"):
        load(tmp_path)


def test_loaded_model_runs_on_new_inputs(tmp_path):
    model = build("mlp", [DynamicInt8Config()])
    save(model, tmp_path)
    loaded = load(tmp_path)
    x = inputs(7, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), model.module(x), rtol=0, atol=0)


def test_round_trip_of_dynamic_int8_with_fallback_layers(tmp_path):
    model = load_model("tiny_models:mlp")
    calibration = [{"input": inputs(8, seed=s).numpy()} for s in range(4)]
    layers = quantize_(model.module, DynamicInt8Config(fallback_layers=1), calibration=calibration)
    assert len(layers) == 1
    x = inputs(5)
    before = model.module(x).detach()
    save(model, tmp_path)
    loaded = load(tmp_path)
    torch.testing.assert_close(loaded.module(x).detach(), before, rtol=0, atol=0)
