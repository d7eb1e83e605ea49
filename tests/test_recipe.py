"""Recipes: validated before anything runs, every mistake reported at once."""

from __future__ import annotations

import pytest
import yaml

from slimkit.deploy.export import ExportConfig
from slimkit.errors import ConfigError
from slimkit.prune import TransformerPruneConfig
from slimkit.quantize import (
    DynamicInt8Config,
    Int4WeightOnlyConfig,
    Int8WeightOnlyConfig,
    OrtDynamicInt8Config,
)
from slimkit.recipe import MeasureSpec, Recipe, TaskSpec, apply_override


def valid_raw() -> dict:
    return {
        "name": "minilm-int8",
        "model": "minilm-l6",
        "task": {"source": "rt-polarity", "train_limit": 200, "test_limit": 100},
        "stages": [
            {"quantize": {"method": "dynamic_int8", "granularity": "per_tensor", "layers": {"ignore": ["pooler.dense"]}}},
        ],
        "compare": [
            {"name": "w4", "stages": [{"quantize": {"method": "int4_weight_only", "group_size": 32}}]},
            {"name": "onnx-int8", "stages": [{"export": {"optimize": "none"}}, {"quantize": {"method": "ort_dynamic_int8"}}]},
            {"name": "w8", "stages": [{"quantize": {"method": "int8_weight_only"}}]},
        ],
        "measure": {"batch_sizes": [1], "rounds": 3, "iters": 2},
    }


def test_valid_recipe_parses_into_typed_configs():
    r = Recipe.from_dict(valid_raw())
    assert r.stages == [DynamicInt8Config.model_validate({"granularity": "per_tensor", "layers": {"ignore": ["pooler.dense"]}})]
    names = [n for n, _ in r.compare]
    assert names == ["w4", "onnx-int8", "w8"]
    w4, onnx_int8, w8 = (cfgs for _, cfgs in r.compare)
    assert w4 == [Int4WeightOnlyConfig(group_size=32)]
    # The export stage's method defaults to the only one registered.
    assert onnx_int8 == [ExportConfig(optimize="none"), OrtDynamicInt8Config()]
    assert w8 == [Int8WeightOnlyConfig()]
    assert r.spec.name == "minilm-int8"
    assert r.spec.task == TaskSpec(source="rt-polarity", train_limit=200, test_limit=100)
    assert r.spec.measure == MeasureSpec(batch_sizes=[1], rounds=3, iters=2)
    assert r.spec.measure.warmup == 3 and r.spec.measure.device == "cpu"
    assert r.spec.variant == "output" and r.spec.output is None
    assert r.raw is not None and r.raw["name"] == "minilm-int8"


def test_every_problem_is_reported_at_once_with_its_key_path():
    raw = {
        "name": "bad",
        "model": "minilm-l6",
        "colour": "blue",  # unknown top-level key
        "measure": {"rounds": "seven"},  # wrong type
        "stages": [
            {"quantize": {"method": "dynamic_int8"}},
            {"sparsify": {"amount": 0.5}},  # unknown stage kind
            {"quantize": {"method": "int3_magic"}},  # unknown method
            {"quantize": {"method": "ort_dynamic_int8"}},  # ort_* before export
            {"export": {}},
            {"quantize": {"method": "dynamic_int8"}},  # torch method after export
            {"quantize": {"method": "dynamic_int8", "granularity": "per_row"}},  # bad value
            {"export": {}},  # second export
        ],
        "compare": [
            {"name": "a", "stages": []},
            {"name": "a", "stages": []},  # duplicate name
            {"name": "fp32"},  # clashes with the baseline
            {"name": "b", "stages": [{"quantize": {"method": "int8_weight_only", "bogus": 1}}]},
        ],
    }
    with pytest.raises(ConfigError) as info:
        Recipe.from_dict(raw)
    problems = info.value.problems

    def one(prefix: str, *words: str) -> str:
        found = [p for p in problems if p.startswith(prefix) and all(w in p for w in words)]
        assert len(found) == 1, (prefix, words, problems)
        return found[0]

    one("colour: unknown key")
    one("measure.rounds: ", "'seven'")
    one("stages[1]: unknown stage 'sparsify'", "export, prune, quantize")
    one("stages[2].quantize.method: unknown method 'int3_magic'", "dynamic_int8")
    one("stages[3].quantize: method 'ort_dynamic_int8' works on an ONNX model", "export")
    one("stages[5].quantize: method 'dynamic_int8' works on a PyTorch model", "already exported")
    one("stages[6].quantize.granularity: ", "'per_row'")
    one("stages[7]: the model is already exported")
    one("compare[1].name: 'a' is used twice")
    one("compare[2].name: 'fp32' is used twice")
    one("compare[3].stages[0].quantize.bogus: unknown key")
    one("stages[0].quantize: method 'dynamic_int8' computes with the operator quantized::linear_dynamic",
        "stages[4].export", "ort_dynamic_int8")
    assert len(problems) == 12
    assert str(info.value).startswith("12 problem(s) found:")


def test_variant_name_clashing_with_compare_name():
    raw = valid_raw() | {"variant": "w8"}
    with pytest.raises(ConfigError) as info:
        Recipe.from_dict(raw)
    assert [p for p in info.value.problems if p.startswith("compare[2].name: 'w8' is used twice")]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"stages": []}, "stages: "),
        ({"name": "has space"}, "name: "),
        ({"version": 2}, "version: 2 is not supported; use version: 1"),
        ({"task": {"train_limit": 1}}, "task.train_limit: "),
        ({"measure": {"batch_sizes": []}}, "measure.batch_sizes: "),
        ({"measure": {"device": "tpu"}}, "measure.device: "),
        ({"stages": ["quantize"]}, "stages[0]: a stage is a mapping with one key"),
        ({"stages": [{"quantize": {"method": "dynamic_int8"}, "export": {}}]}, "stages[0]: a stage is a mapping with one key"),
        ({"stages": [{"quantize": {"method": None, "bits": 3}}]}, "stages[0].quantize.bits: unknown key"),
    ],
)
def test_single_mistakes(change, expected):
    raw = valid_raw() | change
    with pytest.raises(ConfigError) as info:
        Recipe.from_dict(raw)
    assert any(p.startswith(expected) for p in info.value.problems), info.value.problems


def test_missing_required_keys():
    with pytest.raises(ConfigError) as info:
        Recipe.from_dict({})
    assert "name: required key is missing; add it" in info.value.problems
    assert "model: required key is missing; add it" in info.value.problems
    assert "stages: required key is missing; add it" in info.value.problems


def test_not_a_mapping():
    with pytest.raises(ConfigError, match="not list"):
        Recipe.from_dict([1, 2])


@pytest.mark.parametrize("body", ["dynamic_int8", ["dynamic_int8"]])
def test_stage_body_that_is_not_a_mapping_is_a_problem(body):
    raw = valid_raw() | {"stages": [{"quantize": body}]}
    with pytest.raises(ConfigError) as info:
        Recipe.from_dict(raw)
    assert any(p.startswith("stages[0].quantize") for p in info.value.problems)


def test_apply_override_sets_nested_values_read_as_yaml():
    raw = {"measure": {"rounds": 7}}
    apply_override(raw, "measure.rounds=3")
    apply_override(raw, "measure.batch_sizes=[1, 8]")
    apply_override(raw, "measure.energy=false")
    apply_override(raw, "task.source=data/my.csv")
    apply_override(raw, "name=run-1")
    apply_override(raw, "output=")
    assert raw == {
        "measure": {"rounds": 3, "batch_sizes": [1, 8], "energy": False},
        "task": {"source": "data/my.csv"},
        "name": "run-1",
        "output": None,
    }


def test_apply_override_value_may_contain_equals():
    raw: dict = {}
    apply_override(raw, "task.text_column=a=b")
    assert raw == {"task": {"text_column": "a=b"}}


@pytest.mark.parametrize("item", ["measure.rounds", "=3", ""])
def test_apply_override_malformed(item):
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_override({}, item)


def test_apply_override_through_a_list_needs_an_index():
    with pytest.raises(ConfigError, match=r"stages is a list of 1; index it with 0 to 0"):
        apply_override({"stages": [{"quantize": {}}]}, "stages.method=x")
    with pytest.raises(ConfigError, match=r"stages is a list of 1; index it with 0 to 0"):
        apply_override({"stages": [{"quantize": {}}]}, "stages.3.quantize.method=x")
    with pytest.raises(ConfigError, match=r"name is a value, not a mapping or list"):
        apply_override({"name": "r"}, "name.first=x")


def test_apply_override_indexes_lists():
    raw = {"stages": [{"export": {}}, {"quantize": {"method": "ort_dynamic_int8"}}]}
    apply_override(raw, "stages.1.quantize.per_channel=false")
    apply_override(raw, "stages.0={export: {optimize: none}}")
    assert raw == {"stages": [{"export": {"optimize": "none"}},
                              {"quantize": {"method": "ort_dynamic_int8", "per_channel": False}}]}


def test_apply_override_with_invalid_yaml_value_is_a_config_error():
    with pytest.raises(ConfigError, match="measure.batch_sizes"):
        apply_override({}, "measure.batch_sizes=[1,")


def test_from_file_applies_overrides_before_validating(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(valid_raw()))
    r = Recipe.from_file(path, ["measure.rounds=5", "compare=[]"])
    assert r.spec.measure.rounds == 5
    assert r.compare == []
    assert r.raw["measure"]["rounds"] == 5
    with pytest.raises(ConfigError) as info:
        Recipe.from_file(path, ["measure.rounds=0"])
    assert [p for p in info.value.problems if p.startswith("measure.rounds: ")]


def test_from_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such recipe file"):
        Recipe.from_file(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        Recipe.from_file(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError) as info:
        Recipe.from_file(empty)
    assert "name: required key is missing; add it" in info.value.problems


def test_a_quantize_stage_without_method_takes_the_default_for_where_the_model_is():
    torch_side = Recipe.from_dict({"name": "d", "model": "m", "stages": [{"quantize": None}]})
    assert [c.method for c in torch_side.stages] == ["dynamic_int8"]
    recipe = Recipe.from_dict({"name": "d", "model": "m", "stages": [
        {"export": {}}, {"quantize": {"per_channel": False}}]})
    assert [c.method for c in recipe.stages] == ["onnx", "ort_dynamic_int8"]
    assert recipe.stages[1].per_channel is False


@pytest.mark.parametrize("method, operator", [("dynamic_int8", "quantized::linear_dynamic"),
                                              ("int4_weight_only", "packed uint4 weights")])
def test_a_pytorch_quantization_onnx_cannot_express_is_refused_before_export(method, operator):
    problems = problems_of({"name": "d", "model": "m", "stages": [
        {"quantize": {"method": method, "layers": {"targets": ["re:.*dense"], "ignore": ["pooler.dense"]}}},
        {"export": {}}]})
    assert len(problems) == 1
    assert problems[0].startswith(f"stages[0].quantize: method {method!r} computes with")
    assert operator in problems[0] and "stages[1].export" in problems[0]
    assert "targets ['re:.*dense'], ignore ['pooler.dense']" in problems[0] and "ort_" in problems[0]
    # Without the export the same stage is a valid PyTorch-only pipeline.
    assert Recipe.from_dict({"name": "d", "model": "m", "stages": [{"quantize": {"method": method}}]}).stages


def problems_of(raw):
    with pytest.raises(ConfigError) as err:
        Recipe.from_dict(raw)
    return err.value.problems


def test_output_variant_may_not_be_called_like_the_baseline():
    problems = problems_of({"name": "d", "model": "m", "variant": "fp32", "stages": [{"quantize": None}]})
    assert problems == ["variant: 'fp32' is the name of the baseline; give the output variant another name"]


def test_batch_sizes_must_be_positive():
    problems = problems_of({"name": "d", "model": "m", "stages": [{"quantize": None}], "measure": {"batch_sizes": [1, 0]}})
    assert len(problems) == 1 and problems[0].startswith("measure.batch_sizes.1")


def test_a_stage_written_as_a_string_is_reported_once():
    problems = problems_of({"name": "d", "model": "m", "stages": ["dynamic_int8"]})
    assert len(problems) == 1 and problems[0].startswith("stages[0]: a stage is a mapping")


def test_a_broken_export_still_counts_as_an_export_for_later_stages():
    problems = problems_of({"name": "d", "model": "m", "stages": [
        {"export": {"opset": "seventeen"}}, {"quantize": {"method": "ort_dynamic_int8"}}]})
    assert len(problems) == 1 and problems[0].startswith("stages[0].export.opset")


def test_a_prune_stage_comes_before_the_export():
    recipe = Recipe.from_dict({"name": "p", "model": "m", "stages": [
        {"prune": {"method": "transformer_structured", "heads": 0.5, "ffn": {"0": 0.25}, "importance": "taylor"}},
        {"export": {}}, {"quantize": None}]})
    assert recipe.stages[0] == TransformerPruneConfig(heads=0.5, ffn={0: 0.25}, importance="taylor")
    problems = problems_of({"name": "p", "model": "m", "stages": [
        {"export": {}}, {"prune": {"method": "transformer_structured", "heads": 0.5}}]})
    assert problems == ["stages[1].prune: method 'transformer_structured' works on a PyTorch model but the model is "
                        "already exported; move it before the export stage or use an ort_* method"]


def test_a_prune_stage_names_its_method():
    problems = problems_of({"name": "p", "model": "m", "stages": [{"prune": {"heads": 0.5}}]})
    (problem,) = problems
    assert problem.startswith("stages[0].prune.method: required for a prune stage; choose one of ")
    assert "channels" in problem and "transformer_structured" in problem


def test_a_vision_recipe_validates_with_prepare_train_prune_budget_and_static_int8():
    recipe = Recipe.from_dict({
        "name": "v", "model": "mobilenet-v2",
        "task": {"source": "fashion-mnist", "image_size": 128},
        "prepare": [{"train": {"max_steps": 10, "validation": 500}}],
        "stages": [{"prune": {"method": "channels", "budget": {"macs": 0.6}, "round_to": 8}},
                   {"train": {"teacher": "baseline", "max_steps": 10}},
                   {"export": {}}, {"quantize": {"method": "ort_static_int8"}}]})
    assert [c.kind for c in recipe.prepare] == ["train"]
    assert [c.method for c in recipe.stages] == ["channels", "supervised", "onnx", "ort_static_int8"]
    assert recipe.stages[0].budget.kind == "macs" and recipe.stages[0].budget.target == 0.6
    assert recipe.spec.task.image_size == 128


def test_vision_recipe_mistakes_are_reported_together():
    problems = problems_of({
        "name": "v", "model": "m", "task": {"source": "fashion-mnist", "channels": 2, "image_size": 0},
        "prepare": [{"export": {}}],
        "stages": [{"prune": {"method": "channels", "budget": {"macs": 0.6, "params": 0.5}}},
                   {"train": {"validation": 1.5, "teacher": "someone"}}, {"export": {}}, {"train": {}}]})
    text = "\n".join(problems)
    for expected in ("task.channels", "task.image_size", "prepare[0]: the baseline stays a PyTorch model",
                     "stages[0].prune.budget", "give one budget", "stages[1].train.teacher",
                     "stages[3].train: method 'supervised' works on a PyTorch model"):
        assert expected in text, (expected, problems)


def test_quantization_aware_training_must_be_converted_before_export():
    problems = problems_of({"name": "q", "model": "m", "stages": [
        {"quantize": {"method": "qat_int8"}}, {"export": {}}, {"convert": {}}]})
    assert len(problems) == 2, problems
    assert problems[0].startswith("stages[0].quantize: the fake-quantized layers of qat_int8 must be converted before stages[1].export")
    assert problems[1].startswith("stages[2].convert: method 'qat' works on a PyTorch model but the model is already exported")
    (problem,) = problems_of({"name": "q", "model": "m", "stages": [{"convert": {}}]})
    assert problem.startswith("stages[0].convert: nothing to convert; put a `quantize: {method: qat_int8}` stage")
    ok = Recipe.from_dict({"name": "q", "model": "m", "stages": [
        {"quantize": {"method": "qat_int8"}}, {"convert": {"target": "onnxruntime"}}, {"export": {}},
        {"quantize": {"method": "ort_static_int8", "activation_ranges": "trained"}}]})
    assert [c.kind for c in ok.stages] == ["quantize", "convert", "export", "quantize"]


def test_a_checkpoint_stage_needs_training_after_it_and_an_arena_no_export():
    problems = problems_of({"name": "m", "model": "m", "stages": [
        {"train": {}}, {"checkpoint": {"budget": "40MiB"}}, {"arena": {}}, {"export": {}}]})
    assert problems == [
        "stages[2].arena: the arena serves a PyTorch model, but stages[3] exports it to ONNX Runtime; keep one of the two",
        "stages[1].checkpoint: no train or distill stage follows it; put it before the training it is for",
    ]
    ok = Recipe.from_dict({"name": "m", "model": "m", "stages": [
        {"checkpoint": {"budget": "40MiB"}}, {"train": {}}, {"arena": {"batch_buckets": [1, 8]}}]})
    assert [(c.kind, c.method) for c in ok.stages] == [("checkpoint", "activations"), ("train", "supervised"),
                                                       ("arena", "plan")]


def test_unknown_device_profiles_are_refused_at_validation():
    from slimkit.errors import ConfigError

    raw = {"name": "r", "model": "minilm-l6", "stages": [{"quantize": {}}], "measure": {"devices": ["jetson-nano"]}}
    with pytest.raises(ConfigError, match=r"measure.devices\[0\]: device profile 'jetson-nano': no such profile"):
        Recipe.from_dict(raw)
    raw["measure"] = {"devices": ["raspberry-pi-5"], "energy": False}
    with pytest.raises(ConfigError, match="device estimates come from the energy count"):
        Recipe.from_dict(raw)
