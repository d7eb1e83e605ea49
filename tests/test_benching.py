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
    with pytest.raises(ConfigError, match="--backends tvm: choose among torch, ort"):
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
