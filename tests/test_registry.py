"""The registry: every registered config survives to_dict -> config_from_dict."""

from __future__ import annotations

import pytest

from slimkit import registry, stages
from slimkit.config import LayerSelector, SlimConfig
from slimkit.deploy.export import ExportConfig
from slimkit.errors import ConfigError
from slimkit.prune import LayerStructure, TransformerPruneConfig
from slimkit.quantize import DynamicInt8Config, quantize_

EXPECTED = {
    "arena": ["plan"],
    "checkpoint": ["activations"],
    "cluster": ["kmeans"],
    "convert": ["qat"],
    "distill": ["kd"],
    "export": ["onnx"],
    "prune": ["channels", "magnitude", "make_permanent", "transformer_structured"],
    "quantize": [
        "dynamic_int8",
        "int4_weight_only",
        "int8_weight_only",
        "low_precision",
        "ort_dynamic_int8",
        "ort_fp16",
        "ort_static_int8",
        "pt2e_static_int8",
        "qat_int8",
        "static_int8",
    ],
    "train": ["supervised"],
}
# Transforms recorded with a model (and replayed when it loads) but never written as a stage.
RECORDED_ONLY = {"head": ["replace"]}
# Fields a config cannot do without; every other field has a default.
REQUIRED = {"DistillStageConfig": {"student": {"layers": [0]}}, "MagnitudePruneConfig": {"sparsity": 0.5},
            "HeadConfig": {"classes": 10}}


def example(cls: type[SlimConfig]) -> SlimConfig:
    return cls(**REQUIRED.get(cls.__name__, {}))


def all_config_classes() -> list[type[SlimConfig]]:
    kinds = [*stages.kinds(), *RECORDED_ONLY]
    return [stages.config_class(k, m) for k in kinds for m in stages.methods(k)]


def test_kinds_and_methods():
    assert stages.kinds() == sorted(EXPECTED)
    for kind, methods in EXPECTED.items():
        assert stages.methods(kind) == methods
    assert stages.methods("search") == []
    for kind, methods in RECORDED_ONLY.items():
        assert kind not in stages.kinds() and stages.methods(kind) == methods
    assert stages.config_class("quantize", "int3") is None


@pytest.mark.parametrize("cls", all_config_classes(), ids=lambda c: c.__name__)
def test_default_config_round_trips(cls):
    cfg = example(cls)
    data = cfg.to_dict()
    assert (data["kind"], data["method"]) == (cls.kind, cls.method)
    assert stages.config_class(cls.kind, cls.method) is cls
    back = stages.config_from_dict(data)
    assert type(back) is cls
    assert back == cfg


def test_non_default_configs_round_trip():
    for cfg in [
        DynamicInt8Config(granularity="per_tensor", layers=LayerSelector(targets=["re:0|2"], ignore=["2"])),
        ExportConfig(opset=18, optimize="none"),
        # JSON turns the layer indices into strings; they come back as ints.
        TransformerPruneConfig(heads={0: 0.5, 3: 0.25}, ffn=0.3, importance="michel",
                               kept={0: LayerStructure(heads=[0, 2], ffn=5), 3: LayerStructure(heads=3)}),
    ]:
        assert stages.config_from_dict(cfg.to_dict()) == cfg


def test_every_registered_class_has_a_handler():
    for cls in all_config_classes():
        assert callable(registry.handler_for(example(cls)))


def test_config_from_dict_unknown_method():
    with pytest.raises(ConfigError) as info:
        stages.config_from_dict({"kind": "quantize", "method": "int3", "version": 1})
    (problem,) = info.value.problems
    assert "'int3'" in problem and "dynamic_int8" in problem


def test_config_from_dict_does_not_mutate_its_input():
    data = DynamicInt8Config().to_dict()
    stages.config_from_dict(data)
    assert data["kind"] == "quantize" and data["method"] == "dynamic_int8"


def test_handler_for_unregistered_config():
    class Orphan(SlimConfig):
        kind = "quantize"
        method = "orphan"

    with pytest.raises(ConfigError, match="Orphan"):
        registry.handler_for(Orphan())


def test_register_refuses_a_second_class_under_the_same_name(monkeypatch):
    monkeypatch.setattr(registry, "_CONFIGS", dict(registry._CONFIGS))
    monkeypatch.setattr(registry, "_HANDLERS", dict(registry._HANDLERS))

    class Impostor(SlimConfig):
        kind = "quantize"
        method = "dynamic_int8"

    with pytest.raises(RuntimeError, match="dynamic_int8"):
        registry.register(Impostor)(lambda *a, **k: [])


def test_register_a_new_method(monkeypatch):
    monkeypatch.setattr(registry, "_CONFIGS", dict(registry._CONFIGS))
    monkeypatch.setattr(registry, "_HANDLERS", dict(registry._HANDLERS))

    class Noop(SlimConfig):
        kind = "quantize"
        method = "noop_for_test"

    @registry.register(Noop)
    def noop(model, config, **_):
        return ["x"]

    assert "noop_for_test" in stages.methods("quantize")
    model = type("M", (), {})()
    assert quantize_(model, Noop()) == ["x"]
    assert model._slimkit_transforms == [{"config": Noop().to_dict(), "layers": ["x"]}]


def test_quantize_refuses_a_config_of_another_kind():
    with pytest.raises(ConfigError, match="ExportConfig"):
        quantize_(object(), ExportConfig())
