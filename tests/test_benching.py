"""slimkit bench: a run's variants, or one model, across backends, threads and batch sizes."""

from __future__ import annotations

import json

import pytest

from slimkit.benching import bench, table
from slimkit.cli import main
from slimkit.errors import ConfigError


@pytest.fixture(scope="module")
def tiny_text_model(tmp_path_factory):
    """A 1-layer BERT with MiniLM's tokenizer, saved: bench's text path without the real model's cost."""
    from transformers import BertConfig

    from slimkit.serialize import save
    from slimkit.zoo.models import build_from_spec, load_model

    minilm = load_model("minilm-l6")
    config = BertConfig(vocab_size=minilm.tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=64)
    spec = {**minilm.spec, "hf_config": {**config.to_diff_dict(), "model_type": "bert"}}
    folder = tmp_path_factory.mktemp("tiny") / "tiny-bert"
    model = build_from_spec(spec, None)
    model.tokenizer, model.max_seq_len = minilm.tokenizer, 128
    save(model, folder)
    return folder


def test_each_backend_thread_count_and_batch_is_a_row(tiny_text_model):
    result = bench(str(tiny_text_model), threads=[1, 2], batch_sizes=[1, 2], backends=["torch", "ort"],
                   rounds=2, iters=2, warmup=1)
    rows = result["rows"]
    assert [(r["backend"], r["threads"], r["batch"]) for r in rows if r["backend"] == "torch"] == [
        ("torch", 1, 1), ("torch", 1, 2), ("torch", 2, 1), ("torch", 2, 2)]
    assert len(rows) == 8 and {r["variant"] for r in rows} == {"tiny-bert"}
    assert result["reference"] == "tiny-bert/torch"
    assert all(r["ratio_to_reference"] == 1.0 for r in rows if r["backend"] == "torch")
    assert all(r["median_ms"] > 0 and r["throughput_per_s"] > 0 for r in rows)
    assert "ratio: to tiny-bert/torch" in table(result)


def test_bad_requests_are_refused(tiny_text_model, tmp_path, capsys):
    with pytest.raises(ConfigError, match="--backends tvm: choose among torch, compiled, ort"):
        bench(str(tiny_text_model), [1], [1], ["tvm"])
    assert main(["bench", str(tiny_text_model), "--threads", "one"]) == 2
    assert "--threads 'one': give numbers separated by commas" in capsys.readouterr().err
    assert main(["bench", str(tiny_text_model), "--backends", "ort", "--threads", "1", "--batch-sizes", "1",
                 "--rounds", "1", "--json", str(tmp_path / "b.json")]) == 0
    assert [r["backend"] for r in json.loads((tmp_path / "b.json").read_text())["rows"]] == ["ort"]


def test_a_run_folder_gets_the_rows_and_a_backends_section_in_its_report(tiny_text_model, tmp_path, capsys):
    import shutil
    from pathlib import Path

    run = tmp_path / "run"
    shutil.copytree(tiny_text_model, run / "variants" / "fp32")
    sample = Path(__file__).parent / "report" / "sample_metrics.json"
    (run / "metrics.json").write_text(sample.read_text())
    assert main(["bench", str(run), "--threads", "1,2", "--batch-sizes", "1", "--rounds", "1"]) == 0
    assert f"report:     {run / 'report.html'}" in capsys.readouterr().out
    rows = json.loads((run / "bench.json").read_text())["rows"]
    assert [(r["backend"], r["threads"]) for r in rows] == [("torch", 1), ("ort", 1), ("torch", 2), ("ort", 2)]
    html = (run / "report.html").read_text()
    assert '<table id="backends-table">' in html and 'id="plot-backends"' in html
    assert html.count("<td>fp32</td><td>ort</td>") == 2
    assert json.loads((run / "metrics.json").read_text()) == json.loads(sample.read_text())  # the run's record is kept


def test_a_model_folder_has_no_report_to_write(tiny_text_model, capsys):
    assert main(["bench", str(tiny_text_model), "--backends", "ort", "--threads", "1", "--batch-sizes", "1",
                 "--rounds", "1"]) == 0
    assert "report:" not in capsys.readouterr().out


def test_a_pt2e_model_is_measured_as_compiled_pytorch_beside_compiled_fp32(tmp_path):
    import torch
    import yaml
    from tiny_models import write_image_folder

    from slimkit.quantize import Pt2eStaticInt8Config, quantize_
    from slimkit.serialize import load_model, save

    images = write_image_folder(tmp_path / "images")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"name": "r", "model": "tiny_models:plain_cnn", "stages": [{"export": {}}],
                                      "task": {"source": str(images), "image_size": 16, "normalize": "none"}}))
    runs = tmp_path / "run" / "variants"
    fp32 = load_model("tiny_models:plain_cnn")
    save(fp32, runs / "fp32")
    g = torch.Generator().manual_seed(0)
    quantize_(fp32, Pt2eStaticInt8Config(calibration_samples=8),
              calibration=[(torch.rand(1, 3, 16, 16, generator=g),) for _ in range(8)])
    save(fp32, runs / "pt2e-int8")
    result = bench(str(tmp_path / "run"), [1], [2], ["torch", "compiled", "ort"], recipe=str(recipe),
                   rounds=1, iters=2, warmup=1)
    assert [(r["variant"], r["backend"]) for r in result["rows"]] == [
        ("fp32", "torch"), ("fp32", "compiled"), ("fp32", "ort"), ("pt2e-int8", "torch")]
