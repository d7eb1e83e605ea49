"""``slimkit profile RECIPE``: the recipe's model on the harness's inputs at batch 1."""

from __future__ import annotations

import json

import pytest
import yaml

from slimkit.cli import main

F32 = 4
# tiny_models:mlp is Linear(64, 128) -> ReLU -> Linear(128, 32); its example batch has 4
# rows, profiled at batch 1.
PARAMS = (64 * 128 + 128 + 128 * 32 + 32) * F32
RECIPE = {
    "name": "profile-test",
    "model": "tiny_models:mlp",
    "stages": [{"quantize": {"method": "dynamic_int8"}}],  # not applied: the source model is profiled
    "measure": {"threads": 1},
}


def write(tmp_path, recipe, name="r.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_forward_profile_prints_tables_and_writes_json(tmp_path, capsys):
    out = tmp_path / "profile.json"
    assert main(["profile", str(write(tmp_path, RECIPE)), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "profile-test: memory of one forward pass" in printed
    assert "aten.relu" in printed and "Largest tensors live at the peak" in printed
    d = json.loads(out.read_text())
    assert (d["recipe"], d["model"], d["inputs"], d["train"]) == ("profile-test", "tiny_models:mlp", {"input[0]": [1, 64]}, False)
    # Batch 1: the input is 1 x 64 floats and the two [1, 128] activations peak together.
    assert d["peak"]["bytes"] == PARAMS + 64 * F32 + 2 * 128 * F32
    assert (d["peak"]["op"], d["peak"]["module"]) == ("aten.relu", "1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["profile.json", "r.yaml"]  # no temporary left


def test_training_profile(tmp_path, capsys):
    out = tmp_path / "profile.json"
    assert main(["profile", str(write(tmp_path, RECIPE)), "--train", "--json", str(out), "--top", "3"]) == 0
    assert "training step" in capsys.readouterr().out
    d = json.loads(out.read_text())
    assert d["train"] is True and len(d["largest"]) == 3
    assert d["end"]["gradients"] == PARAMS
    assert d["end"]["optimizer_state"] == 2 * PARAMS + 4 * F32  # AdamW: two moments and a step count


def test_overrides_apply(tmp_path, capsys):
    assert main(["profile", str(write(tmp_path, RECIPE)), "measure.threads=2"]) == 0
    assert "Peak" in capsys.readouterr().out


@pytest.mark.parametrize("recipe, args, expected", [
    ({**RECIPE, "modle": "x"}, [], "modle: unknown key"),
    ({**RECIPE, "model": "tiny_models:no_such_factory"}, [], "no_such_factory"),
    (RECIPE, ["--top", "-1"], "--top -1"),
])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, recipe, args, expected):
    out = tmp_path / "profile.json"
    assert main(["profile", str(write(tmp_path, recipe)), "--json", str(out), *args]) == 2
    assert expected in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.integration
def test_text_model_is_profiled_on_real_text_at_the_recipe_sequence_length(tmp_path, capsys):
    recipe = {"name": "minilm-profile", "model": "minilm-l6", "task": {"source": "rt-polarity", "test_limit": 20},
              "stages": [{"quantize": {"method": "dynamic_int8"}}], "measure": {"seq_len": 16, "threads": 1}}
    out = tmp_path / "profile.json"
    assert main(["profile", str(write(tmp_path, recipe)), "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    assert d["inputs"] == {"input_ids": [1, 16], "attention_mask": [1, 16], "token_type_ids": [1, 16]}
    assert d["peak"]["by_category"]["parameters"] == 22_713_216 * F32
    assert d["peak"]["module"].startswith("backbone.")
    assert d["end"]["activations"] == 0
