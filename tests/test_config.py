"""Typed configs: unknown fields are errors naming their key path; configs are frozen."""

from __future__ import annotations

import pydantic
import pytest
from pydantic import ValidationError

from slimkit.config import LayerSelector, SlimConfig, format_validation_error, validate_config
from slimkit.errors import ConfigError, SlimkitError
from slimkit.quantize import DynamicInt8Config, Int4WeightOnlyConfig


class _NeedsThreshold(SlimConfig):
    kind = "test"
    method = "needs_threshold"
    threshold: float


def test_unknown_field_is_a_pydantic_validation_error():
    with pytest.raises(ValidationError) as info:
        DynamicInt8Config(granularty="per_tensor")
    assert info.value.errors()[0]["type"] == "extra_forbidden"
    assert info.value.errors()[0]["loc"] == ("granularty",)


def test_validate_config_turns_unknown_field_into_config_error_with_key_path():
    with pytest.raises(ConfigError) as info:
        validate_config(DynamicInt8Config, {"granularty": "per_tensor"}, prefix="stages[0].quantize")
    err = info.value
    assert isinstance(err, SlimkitError)
    assert err.problems == ["stages[0].quantize.granularty: unknown key; remove it or check its spelling"]
    assert "1 problem(s) found" in str(err)


def test_validate_config_reports_every_problem_at_once():
    data = {"granularity": "per_row", "layers": {"targets": ["a"], "ingore": ["b"]}, "bogus": 1}
    with pytest.raises(ConfigError) as info:
        validate_config(DynamicInt8Config, data)
    problems = info.value.problems
    assert len(problems) == 3
    assert any(p.startswith("granularity: ") and "'per_row'" in p for p in problems)
    assert "layers.ingore: unknown key; remove it or check its spelling" in problems
    assert "bogus: unknown key; remove it or check its spelling" in problems


def test_wrong_literal_names_path_and_value():
    with pytest.raises(ConfigError) as info:
        validate_config(Int4WeightOnlyConfig, {"group_size": 48}, prefix="q")
    (problem,) = info.value.problems
    assert problem.startswith("q.group_size: ")
    assert "(got 48)" in problem


def test_missing_required_key_is_reported():
    with pytest.raises(ConfigError) as info:
        validate_config(_NeedsThreshold, {})
    assert info.value.problems == ["threshold: required key is missing; add it"]


def test_valid_data_gives_typed_config_with_defaults():
    cfg = validate_config(DynamicInt8Config, {"granularity": "per_tensor", "layers": {"ignore": ["2"]}})
    assert isinstance(cfg, DynamicInt8Config)
    assert cfg.granularity == "per_tensor"
    assert cfg.layers == LayerSelector(targets=["re:.*"], ignore=["2"])
    assert cfg.version == 1


def test_configs_are_frozen():
    cfg = DynamicInt8Config()
    with pytest.raises(ValidationError):
        cfg.granularity = "per_tensor"


def test_to_dict_carries_kind_and_method():
    cfg = Int4WeightOnlyConfig(group_size=32)
    assert cfg.to_dict() == {
        "kind": "quantize",
        "method": "int4_weight_only",
        "version": 1,
        "group_size": 32,
        "scale_dtype": "float16",
        "layers": {"targets": ["re:.*"], "ignore": []},
    }


def test_layer_selector_defaults_and_strictness():
    sel = LayerSelector()
    assert sel.targets == ["re:.*"] and sel.ignore == []
    with pytest.raises(ValidationError):
        LayerSelector(target=["x"])


def test_format_validation_error_without_prefix():
    try:
        LayerSelector.model_validate({"targets": "not-a-list"})
    except pydantic.ValidationError as err:
        (line,) = format_validation_error(err)
    assert line.startswith("targets: ") and "(got 'not-a-list')" in line
