"""slimkit export: a model to ONNX at each precision, checked against PyTorch before it is written."""

from __future__ import annotations

import pytest
import yaml
from tiny_models import SPEC_MLP, mlp, write_image_folder

from slimkit.cli import main
from slimkit.deploy.onnx_model import OnnxModel
from slimkit.errors import ConfigError
from slimkit.exporting import ExportMismatch, export_model
from slimkit.serialize import load, save
from slimkit.zoo.models import LoadedModel


@pytest.fixture
def saved(tmp_path):
    module, example = mlp()
    save(LoadedModel(module, dict(SPEC_MLP), example_inputs=example), tmp_path / "mlp")
    return tmp_path / "mlp"


@pytest.mark.parametrize(("precision", "cosine"), [("fp32", 0.99999), ("fp16", 0.9999), ("int8-dynamic", 0.99)])
def test_each_precision_exports_and_matches_pytorch(saved, tmp_path, precision, cosine):
    report = export_model(str(saved), precision, tmp_path / "out")
    assert report["cosine"] >= cosine
    if precision == "fp32":
        assert report["max_abs_diff"] <= 1e-4
    assert isinstance(load(tmp_path / "out"), OnnxModel)


def test_static_int8_calibrates_on_the_recipes_train_split(tmp_path):
    images = write_image_folder(tmp_path / "images")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"name": "r", "model": "tiny_models:plain_cnn", "stages": [{"export": {}}],
                                      "task": {"source": str(images), "image_size": 16, "normalize": "none"}}))
    report = export_model("tiny_models:plain_cnn", "int8-static", tmp_path / "out", recipe=str(recipe),
                          calibration_samples=16)
    assert report["cosine"] >= 0.98  # int8 against fp32 PyTorch, reported
    with pytest.raises(ConfigError, match="int8-static calibrates on the task's train split"):
        export_model("tiny_models:plain_cnn", "int8-static", tmp_path / "other")
    assert not (tmp_path / "other").exists()


def test_bad_requests_are_refused_and_nothing_is_written(saved, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="--precision 'int3': choose one of fp32, fp16, int8-dynamic, int8-static"):
        export_model(str(saved), "int3", tmp_path / "out")
    export_model(str(saved), "fp32", tmp_path / "onnx")
    with pytest.raises(ConfigError, match="the model is already ONNX"):
        export_model(str(tmp_path / "onnx"), "fp16", tmp_path / "again")
    # An export whose outputs disagree is not written.
    import slimkit.exporting as E

    monkeypatch.setitem(E.TOLERANCES, "fp16", (None, 1.01))
    with pytest.raises(ExportMismatch, match="fp16: ONNX Runtime's outputs differ from PyTorch's"):
        export_model(str(saved), "fp16", tmp_path / "mismatch")
    assert not (tmp_path / "mismatch").exists()


def test_the_command_line_exports(saved, tmp_path, capsys):
    assert main(["export", str(saved), "--precision", "fp16", "-o", str(tmp_path / "o")]) == 0
    assert "fp16 ONNX, against PyTorch" in capsys.readouterr().out
    assert main(["export", str(saved), "--precision", "int3", "-o", str(tmp_path / "p")]) == 2


def test_static_int8_of_a_qat_model_is_held_to_its_pytorch_int8_twin(tmp_path):
    import torch

    from slimkit.quantize import QATConfig, convert_qat_, quantize_
    from slimkit.serialize import load_model

    images = write_image_folder(tmp_path / "images")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"name": "r", "model": "tiny_models:plain_cnn", "stages": [{"export": {}}],
                                      "task": {"source": str(images), "image_size": 16, "normalize": "none"}}))
    model = load_model("tiny_models:plain_cnn")
    quantize_(model.module, QATConfig(target="onnxruntime", activations="observed", modules=["linear", "conv2d"]))
    model.module.train()
    with torch.no_grad():  # the observed ranges settle on a few batches
        for seed in range(4):
            model.module(torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(seed)))
    convert_qat_(model.module.eval())
    save(model, tmp_path / "qat")
    report = export_model(str(tmp_path / "qat"), "int8-static", tmp_path / "out", recipe=str(recipe),
                          calibration_samples=16)
    assert report["reference"] == "int8-twin"
    assert report["cosine"] >= 0.9999
    plain = export_model("tiny_models:plain_cnn", "int8-static", tmp_path / "plain", recipe=str(recipe),
                         calibration_samples=16)
    assert plain["reference"] == "pytorch"
