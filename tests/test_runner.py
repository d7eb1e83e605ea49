"""A whole recipe run on the real minilm-l6 and a small rt-polarity subset."""

import json

import numpy as np
import pytest

from slimkit import serialize
from slimkit.deploy.ort_runtime import OrtEncoder
from slimkit.measure.inputs import fixed_length_batch
from slimkit.recipe import Recipe
from slimkit.runner import run

pytestmark = pytest.mark.integration

RECIPE = {
    "name": "tiny-run",
    "model": "minilm-l6",
    "task": {"source": "rt-polarity", "train_limit": 120, "test_limit": 60},
    "variant": "slimkit-int8",
    "stages": [{"export": {}}, {"quantize": {"method": "ort_dynamic_int8"}}],
    "compare": [{"name": "torch-int8", "stages": [{"quantize": {"method": "dynamic_int8"}}]}],
    "measure": {"batch_sizes": [1, 2], "seq_len": 32, "rounds": 2, "iters": 1, "warmup": 1, "threads": 1},
}


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    from slimkit.distill.students import shallow_transformer
    from slimkit.zoo.models import load_model

    # A variant of another model (a 2-layer student), measured against the same baseline.
    student_dir = tmp_path_factory.mktemp("student") / "l2"
    serialize.save(shallow_transformer(load_model("minilm-l6"), [0, 5]), student_dir)
    # And a variant distilled in the run: a 1-layer student, a few steps, then int8.
    distilled = {"name": "distilled", "stages": [
        {"distill": {"student": {"layers": [5]}, "validation_texts": 20, "epochs": 2, "batch_size": 25,
                     "lr": 5e-4, "max_len": 32, "hidden_weight": 0.0}},
        {"quantize": {"method": "dynamic_int8"}}]}
    # And a variant pruned to 90% of the parameters, per-layer amounts from a sensitivity analysis.
    pruned = {"name": "pruned", "stages": [
        {"prune": {"method": "transformer_structured", "budget": {"keep": 0.9, "ratios": [0.5], "batches": 4}}}]}
    recipe = {**RECIPE, "compare": [*RECIPE["compare"], {"name": "student", "model": str(student_dir)}, distilled,
                                    pruned]}
    return run(Recipe.from_dict(recipe), tmp_path_factory.mktemp("runs") / "tiny", progress=False)


def test_run_folder_holds_every_artifact(run_folder):
    names = {p.name for p in run_folder.iterdir()}
    assert {"model.onnx", "slimkit.json", "metrics.json", "report.html", "recipe.yaml", "tokenizer", "variants"} <= names
    assert sorted(p.name for p in (run_folder / "variants").iterdir()) == ["distilled", "fp32", "pruned", "slimkit-int8", "student", "torch-int8"]
    assert not list(run_folder.parent.glob(".*partial")), "no temporary folder may be left behind"
    assert not list(run_folder.parent.glob(".*checkpoints")), "training checkpoints go once the run is complete"


def test_metrics_cover_every_variant_with_the_same_harness(run_folder):
    m = json.loads((run_folder / "metrics.json").read_text())
    assert m["schema_version"] == 1 and m["baseline"] == "fp32"
    assert m["harness"]["threads"] == 1 and m["harness"]["seq_len"] == 32
    assert m["task"] == {"name": "rt-polarity", "kind": "text", "train_size": 120, "test_size": 60}
    by = {v["name"]: v for v in m["variants"]}
    assert by["fp32"]["latency"]["1"]["ratio_to_baseline"] == 1.0
    assert by["fp32"]["accuracy"]["frozen_head_drop_pp"] == 0.0
    assert by["fp32"]["accuracy"]["cosine_mean"] == pytest.approx(1.0, abs=1e-6)
    ours = by["slimkit-int8"]
    assert ours["is_output"] and ours["framework"] == "onnx"
    assert ours["size_ratio"] < 0.3  # int8 weights and int8 embeddings
    assert ours["accuracy"]["cosine_mean"] > 0.98
    assert ours["torch_imported"] is False, "the ONNX variant must be served without torch"
    assert by["fp32"]["torch_imported"] is True
    assert ours["peak_rss_bytes"] < by["fp32"]["peak_rss_bytes"]
    assert 0.5 < ours["energy"]["int8_mac_fraction"] <= 1.0
    assert by["fp32"]["energy"]["int8_mac_fraction"] == 0.0
    student = by["student"]
    assert student["size_ratio"] < 0.9 and student["accuracy"]["cosine_mean"] < 0.99  # not distilled
    assert student["energy"]["macs"] < 0.5 * by["fp32"]["energy"]["macs"]  # 2 of 6 layers
    assert all(v["training"] is None for n, v in by.items() if n != "distilled")
    assert all(v["pruning"] is None for n, v in by.items() if n != "pruned")


def test_distilled_variant_records_its_training_and_the_report_shows_it(run_folder):
    m = json.loads((run_folder / "metrics.json").read_text())
    v = next(v for v in m["variants"] if v["name"] == "distilled")
    (t,) = v["training"]
    assert t["stage"] == 0 and t["kind"] == "distill" and t["train_texts"] == 100 and t["validation_texts"] == 20 and t["steps"] == 8
    assert len(t["history"]) == 8 and len(t["evals"]) == 2
    assert t["best"]["value"] > t["before"]["val_cosine"]
    # The task's labels give every evaluation a task metric too (a head on the 100 training texts).
    assert t["head_texts"] == 100 and all(0 <= e["val_accuracy"] <= 1 for e in [t["before"], *t["evals"]])
    assert t["parameters"]["student"] < 0.75 * t["parameters"]["teacher"]
    # Energy counts the 1-layer student's arithmetic, not the teacher's.
    fp32 = next(x for x in m["variants"] if x["name"] == "fp32")
    assert v["energy"]["macs"] < 0.3 * fp32["energy"]["macs"]
    assert [s["kind"] for s in v["stages"]] == ["distill", "quantize"]
    html = (run_folder / "report.html").read_text()
    assert 'id="training-table"' in html and 'id="plot-training"' in html
    assert "layers [5], from the teacher" in html
    again = serialize.load(run_folder / "variants" / "distilled")
    assert len(again.module.backbone.encoder.layer) == 1


def test_saved_output_reloads_with_the_same_outputs(run_folder):
    model = serialize.load(run_folder)
    feed = fixed_length_batch(model.tokenizer, ["a fine film, and a long one"], 2, 16, 512)
    args = (feed["input_ids"], feed["attention_mask"], feed["token_type_ids"])
    again = OrtEncoder(str(model.path))(*args)
    inrun = OrtEncoder(str(run_folder / "variants" / "slimkit-int8" / "model.onnx"))(*args)
    np.testing.assert_array_equal(again, inrun)


def test_saved_torch_variant_reloads_bit_exact(run_folder):
    import torch

    folder = run_folder / "variants" / "torch-int8"
    a, b = serialize.load(folder), serialize.load(folder)
    ids = torch.tensor([[101, 2023, 2003, 1037, 2307, 3185, 102]])
    torch.testing.assert_close(a.module(ids, torch.ones_like(ids)), b.module(ids, torch.ones_like(ids)), rtol=0, atol=0)
    assert json.loads((folder / "slimkit.json").read_text())["transforms"][0]["config"]["method"] == "dynamic_int8"


def test_report_profiles_the_baseline_forward_pass(run_folder):
    m = json.loads((run_folder / "metrics.json").read_text())
    prof = m["memory_profile"]
    assert prof["model"] == "minilm-l6" and prof["train"] is False
    assert prof["inputs"]["input_ids"] == [1, 32]  # the harness's smallest batch, its sequence length
    assert prof["peak"]["bytes"] > 0 and prof["modules"]
    html = (run_folder / "report.html").read_text()
    assert "<h2>Memory profile</h2>" in html and 'id="plot-memory-profile"' in html


def test_budget_pruning_records_its_sensitivity_and_the_report_plots_it(run_folder):
    m = json.loads((run_folder / "metrics.json").read_text())
    v = next(v for v in m["variants"] if v["name"] == "pruned")
    (rec,) = v["pruning"]
    assert rec["stage"] == 0 and rec["kind"] == "sensitivity"
    assert len(rec["sensitivity"]["groups"]) == 12  # 6 layers, heads and FFN
    choice = rec["choice"]
    assert choice["cost"] <= choice["budget"] == pytest.approx(0.9 * choice["total"])
    model = serialize.load(run_folder / "variants" / "pruned")
    assert sum(p.numel() for p in model.module.parameters()) == choice["cost"]
    html = (run_folder / "report.html").read_text()
    assert "<h2>Pruning sensitivity: pruned</h2>" in html and 'id="plot-sensitivity-0"' in html
    assert 'id="pruning-table-0"' in html
