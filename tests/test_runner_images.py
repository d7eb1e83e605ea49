"""A whole recipe run on an image task: a user CNN given as package.module:function, an
image folder, and every stage of the vision pipeline (train, prune, recovery, ONNX int8)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import write_image_folder

from slimkit import serialize
from slimkit.deploy.ort_runtime import OrtRunner
from slimkit.recipe import Recipe
from slimkit.runner import run

TESTS_DIR = Path(__file__).resolve().parent
TRAIN = {"max_steps": 30, "batch_size": 16, "lr": 3e-2, "validation": 24, "eval_every": 10, "patience": None}
RECOVER = {**TRAIN, "teacher": "baseline", "max_steps": 10}


def recipe(folder) -> dict:
    return {
        "name": "tiny-vision",
        "model": "tiny_models:tiny_classifier",
        "task": {"source": str(folder), "image_size": 16, "normalize": "none"},
        "prepare": [{"train": TRAIN}],
        "variant": "pruned-int8",
        "stages": [
            {"prune": {"method": "channels", "budget": {"macs": 0.7, "ratios": [0.5], "images": 24}}},
            {"train": RECOVER},
            {"export": {}},
            {"quantize": {"method": "ort_static_int8", "calibration_samples": 16}},
        ],
        "compare": [
            {"name": "ort-fp32", "stages": [{"export": {}}]},
            # The same recovery training with and without activation checkpointing.
            {"name": "recovered", "stages": [{"train": RECOVER}]},
            {"name": "recovered-checkpointed", "stages": [{"checkpoint": {"blocks": ["stem", "block"]}},
                                                          {"train": RECOVER}]},
            # The baseline served from a planned activation arena.
            {"name": "arena", "stages": [{"arena": {}}]},
            # Quantization-aware training: fake-quantized layers trained, converted, then
            # static int8 with the trained input ranges.
            {"name": "qat-int8", "stages": [
                {"quantize": {"method": "qat_int8", "modules": ["linear", "conv2d"], "activations": "observed"}},
                {"train": {**TRAIN, "max_steps": 6, "lr": 1e-3}},
                {"convert": {}},
                {"export": {}},
                {"quantize": {"method": "ort_static_int8", "activation_ranges": "trained"}}]},
            # PyTorch-native static int8 (torchao's PT2E flow, compiled by Inductor).
            {"name": "pt2e-int8", "stages": [{"quantize": {"method": "pt2e_static_int8", "calibration_samples": 16}}]},
            {"name": "pruned-fp32", "stages": [
                {"prune": {"method": "channels", "budget": {"macs": 0.7, "ratios": [0.5], "images": 24}}},
                {"train": RECOVER}]},
        ],
        "measure": {"batch_sizes": [1, 4], "rounds": 2, "iters": 2, "warmup": 1, "threads": 1,
                    "devices": ["raspberry-pi-5"]},
    }


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    folder = write_image_folder(tmp_path_factory.mktemp("images"))
    # The serving process that measures peak memory imports the model's factory too.
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR), before]))
    try:
        return run(Recipe.from_dict(recipe(folder)), tmp_path_factory.mktemp("runs") / "tiny-vision", progress=False)
    finally:
        if before is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = before


def variants(run_folder) -> dict[str, dict]:
    m = json.loads((run_folder / "metrics.json").read_text())
    return {v["name"]: v for v in m["variants"]}


def test_the_run_writes_every_variant_and_the_image_task(run_folder):
    m = json.loads((run_folder / "metrics.json").read_text())
    assert m["task"]["kind"] == "image" and m["task"]["classes"] == ["class0", "class1", "class2"]
    assert m["task"]["train_size"] == 120 and m["task"]["test_size"] == 36
    assert m["task"]["input"] == {"size": [16, 16], "channels": 3, "normalize": "none"}
    assert sorted(variants(run_folder)) == ["arena", "fp32", "ort-fp32", "pruned-fp32", "pruned-int8", "pt2e-int8",
                                            "qat-int8", "recovered", "recovered-checkpointed"]
    assert not list(run_folder.parent.glob(".*checkpoints")), "training checkpoints go once the run is complete"


def test_the_baseline_is_the_fine_tuned_model_with_a_head_for_the_task(run_folder):
    v = variants(run_folder)["fp32"]
    assert [s["kind"] for s in v["stages"]] == ["train"]
    (record,) = v["training"]
    assert record["kind"] == "train" and record["steps"] == 30 and record["head"]["classes"] == 3
    assert record["train_images"] == 96 and record["validation_images"] == 24
    model = serialize.load(run_folder / "variants" / "fp32")
    assert model.module.head.out_features == 3, "the saved model rebuilds the new head"
    # The classes are a bright bar's position: a few steps learn them.
    assert v["accuracy"]["top1"] >= 0.9 and v["accuracy"]["top1_drop_pp"] == 0.0


def test_pruning_met_its_mac_budget_and_the_recovery_distilled_the_baseline(run_folder):
    vs = variants(run_folder)
    out, fp32 = vs["pruned-int8"], vs["fp32"]
    (analysis,) = out["pruning"]
    assert analysis["choice"]["cost"] <= analysis["choice"]["budget"] and analysis["choice"]["kind"] == "macs"
    assert analysis["metric"] == "validation accuracy" and analysis["sensitivity"]["groups"]
    assert [t["kind"] for t in out["training"]] == ["train"] and out["training"][0]["teacher"] == "baseline"
    # The same prune and recovery built both pruned variants once: the same records.
    assert vs["pruned-fp32"]["pruning"] == out["pruning"] and vs["pruned-fp32"]["training"] == out["training"]
    assert out["energy"]["macs"] < 0.75 * fp32["energy"]["macs"]
    assert out["energy"]["int8_mac_fraction"] > 0.9, "static int8 prices the convolutions and the head as int8"
    assert vs["ort-fp32"]["energy"]["int8_mac_fraction"] == 0.0


def test_every_variant_is_scored_on_the_whole_test_split_against_the_baseline(run_folder):
    vs = variants(run_folder)
    base = vs["fp32"]["accuracy"]["top1"]
    for name, v in vs.items():
        acc = v["accuracy"]
        assert set(acc) == {"top1", "top1_drop_pp", "agreement"}
        assert acc["top1"] * 36 == pytest.approx(round(acc["top1"] * 36)), "a fraction of the 36 test images"
        assert acc["top1_drop_pp"] == pytest.approx((base - acc["top1"]) * 100), name
    assert vs["ort-fp32"]["accuracy"]["agreement"] == 1.0, "ONNX Runtime fp32 predicts what PyTorch does"
    for v in vs.values():
        assert set(v["latency"]) == {"1", "4"} and v["peak_rss_bytes"] > 0


def test_the_int8_output_answers_like_the_saved_pytorch_variant(run_folder):
    fp32 = serialize.load(run_folder / "variants" / "pruned-fp32").module
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        ref = fp32(x).numpy()
    out = OrtRunner(str(run_folder / "model.onnx"))(x.numpy())
    assert out.shape == (4, 3)
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.75
    assert np.corrcoef(out.ravel(), ref.ravel())[0, 1] > 0.95


def test_the_report_shows_top1_accuracy(run_folder):
    html = (run_folder / "report.html").read_text()
    assert "top-1" in html.lower() and "pruned-int8" in html
    # Supervised training only: no distillation table (a checkpoint record is not one).
    assert 'id="supervised-table"' in html and 'id="training-table"' not in html


def test_quantization_aware_training_converts_to_int8_with_its_trained_ranges(run_folder):
    import onnx

    meta = json.loads((run_folder / "variants" / "qat-int8" / "slimkit.json").read_text())
    assert [t["config"]["method"] for t in meta["transforms"]] == ["onnx", "ort_static_int8"]
    assert sorted(meta["transforms"][1]["layers"]) == ["block.0", "block.3", "head", "stem.0"]
    graph = onnx.load(str(run_folder / "variants" / "qat-int8" / "model.onnx")).graph
    # Each layer reads its input through the range it trained (an Identity carrying the override).
    assert len([n for n in graph.node if n.name.endswith("/input_range")]) == 4
    assert not [n for n in graph.node if "FakeQuant" in n.name]
    v = variants(run_folder)["qat-int8"]
    assert v["accuracy"]["agreement"] >= 0.75 and v["energy"]["int8_mac_fraction"] > 0.9


def test_the_pt2e_variant_is_saved_int8_and_answers_like_the_baseline(run_folder):
    from slimkit.quantize import Pt2eInt8Module

    meta = json.loads((run_folder / "variants" / "pt2e-int8" / "slimkit.json").read_text())
    (record,) = [t for t in meta["transforms"] if t["config"]["method"] == "pt2e_static_int8"]
    assert record["layers"] == ["stem.0", "block.0", "block.3", "head"]
    model = serialize.load(run_folder / "variants" / "pt2e-int8")
    assert isinstance(model.module, Pt2eInt8Module) and model.module.compiled
    v = variants(run_folder)["pt2e-int8"]
    assert v["accuracy"]["agreement"] >= 0.75 and v["energy"]["int8_mac_fraction"] > 0.9
    assert set(v["latency"]) == {"1", "4"} and v["peak_rss_bytes"] > 0


def test_checkpointed_training_ends_with_the_same_model(run_folder):
    from tiny_models import assert_same_state

    vs = variants(run_folder)
    (record, trained) = vs["recovered-checkpointed"]["training"]
    assert record["kind"] == "checkpoint" and record["blocks"] == ["stem", "block"] and record["batch_size"] == 16
    assert trained["kind"] == "train" and trained["stage"] == 1
    plain = serialize.load(run_folder / "variants" / "recovered").module
    checkpointed = serialize.load(run_folder / "variants" / "recovered-checkpointed").module
    # Recomputation changes memory, not arithmetic: the weights and batch-norm statistics match.
    assert_same_state(plain, checkpointed)
    assert "forward" not in checkpointed.stem.__dict__, "the saved model runs its plain forward"


def test_the_arena_variant_is_served_from_its_planned_arena(run_folder):
    meta = json.loads((run_folder / "variants" / "arena" / "slimkit.json").read_text())
    arena = [t for t in meta["transforms"] if t["config"]["kind"] == "arena"]
    assert len(arena) == 1 and arena[0]["config"]["batch_buckets"] == [1, 4] and arena[0]["layers"] == []
    v = variants(run_folder)["arena"]
    assert v["accuracy"]["agreement"] == 1.0 and v["accuracy"]["top1_drop_pp"] == 0.0
    assert v["peak_rss_bytes"] > 0 and set(v["latency"]) == {"1", "4"}


def test_each_variant_carries_its_estimate_on_the_named_device(run_folder):
    v = variants(run_folder)
    for name, variant in v.items():
        (estimate,) = variant["energy"]["devices"]
        assert estimate["device"] == "raspberry-pi-5" and estimate["estimate"] is True, name
        assert estimate["latency_ms"] > 0 and estimate["energy_mj"] > 0
    # The int8 variant computes most MACs at the Cortex-A76's int8 rate; the pruned one has fewer.
    assert v["pruned-int8"]["energy"]["devices"][0]["latency_ms"] < v["fp32"]["energy"]["devices"][0]["latency_ms"]
