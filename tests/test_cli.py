"""The command line: validation and bad input give clear errors, exit 2, and leave nothing."""

import shutil
from pathlib import Path

import pytest
import yaml

from slimkit.cli import main

GOOD = {
    "name": "cli-test",
    "model": "minilm-l6",
    "task": {"source": "rt-polarity", "train_limit": 40, "test_limit": 20},
    "stages": [{"quantize": {"method": "dynamic_int8"}}],
    "measure": {"batch_sizes": [1], "seq_len": 16, "rounds": 1, "iters": 1, "warmup": 0,
                "memory": False, "energy": False},
}


def write(tmp_path, recipe, name="r.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_validate_accepts_a_good_recipe(tmp_path, capsys):
    assert main(["validate", str(write(tmp_path, GOOD))]) == 0
    assert "valid" in capsys.readouterr().out


def test_validate_reports_every_mistake_at_once(tmp_path, capsys):
    bad = {**GOOD, "modle": "x", "measure": {"rounds": "many"},
           "stages": [{"quantise": {}}, {"quantize": {"method": "dynamic_int8", "granularity": "per_row"}}]}
    assert main(["validate", str(write(tmp_path, bad))]) == 2
    err = capsys.readouterr().err
    assert "modle: unknown key" in err
    assert "measure.rounds" in err
    assert "stages[0]: unknown stage 'quantise'" in err
    assert "stages[1].quantize.granularity" in err
    assert "4 problem(s)" in err


def test_missing_recipe_file(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 2
    assert "no such recipe file" in capsys.readouterr().err


def test_bad_override_is_explained(tmp_path, capsys):
    assert main(["validate", str(write(tmp_path, GOOD)), "measure.rounds"]) == 2
    assert "key.path=value" in capsys.readouterr().err


def run_fails(tmp_path, capsys, recipe, *overrides):
    out = tmp_path / "run"
    code = main(["run", str(write(tmp_path, recipe)), *overrides, "-o", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert not out.exists(), "a failed run must leave no run folder"
    assert not list(tmp_path.glob(".run.*")), "nor a temporary one"
    return err


def test_missing_model(tmp_path, capsys):
    err = run_fails(tmp_path, capsys, {**GOOD, "model": str(tmp_path / "no-such-model")})
    assert "no-such-model" in err and "zoo name" in err


@pytest.mark.integration
def test_corrupt_model_file(tmp_path, capsys):
    from slimkit.zoo.models import zoo_model_dir

    broken = tmp_path / "broken-model"
    shutil.copytree(zoo_model_dir("minilm-l6"), broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 100)
    err = run_fails(tmp_path, capsys, {**GOOD, "model": str(broken)})
    assert "broken-model" in err and "corrupt" in err


@pytest.mark.integration
def test_unknown_layer_name(tmp_path, capsys):
    stages = [{"quantize": {"method": "dynamic_int8", "layers": {"targets": ["backbone.encoder.layer.9.output.dense"]}}}]
    err = run_fails(tmp_path, capsys, {**GOOD, "stages": stages})
    assert "layer.9.output.dense" in err and "matches no layer" in err


@pytest.mark.integration
def test_sequence_longer_than_the_model_allows(tmp_path, capsys):
    err = run_fails(tmp_path, capsys, GOOD, "measure.seq_len=4096")
    assert "4096" in err and "512" in err


@pytest.mark.integration
@pytest.mark.parametrize("rows, expected", [
    ([], "empty"),
    ([("good", "pos"), ("fine", "pos"), ("great", "pos")], "'pos'"),
])
def test_degenerate_csv_dataset(tmp_path, capsys, rows, expected):
    csv = tmp_path / "data.csv"
    csv.write_text("text,label\n" + "".join(f"{t},{label}\n" for t, label in rows))
    err = run_fails(tmp_path, capsys, {**GOOD, "task": {"source": str(csv)}})
    assert expected in err and "data.csv" in err


def test_unknown_task_file(tmp_path, capsys):
    err = run_fails(tmp_path, capsys, {**GOOD, "task": {"source": str(tmp_path / "absent.csv")}})
    assert "absent.csv" in err


def test_previous_run_folder_survives_a_failed_run(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    code = main(["run", str(write(tmp_path, {**GOOD, "model": "/nonexistent"})), "-o", str(out), "--no-progress"])
    assert code == 2
    assert (out / "metrics.json").read_text() == "{}"
    assert Path(out).is_dir()
