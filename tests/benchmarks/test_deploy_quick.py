"""benchmarks/deploy.py runs both models' recipes and the export checks in its quick mode."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from slimkit.zoo.images import FASHION_MNIST_DIR

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "deploy.py"
CHECK = ROOT.parent / "shared" / "check_targets.py"


@pytest.mark.integration
def test_deploy_quick(tmp_path):
    if not FASHION_MNIST_DIR.is_dir() and not os.environ.get("SLIMKIT_FASHION_MNIST") and not os.environ.get("CI"):
        pytest.skip("needs the Debian package dataset-fashion-mnist (make test installs it as root)")
    out, work = tmp_path / "deploy.json", tmp_path / "work"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--work", str(work)],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "deploy" and doc["quick"] is True
    assert {"machine", "threads", "versions", "command", "git_commit"} <= set(doc)
    targets = {t["name"]: t for t in doc["targets"]}
    assert list(targets) == ["every_variant_exports_matches_and_runs", "mobilenetv2_int8_static_latency_b1_vs_ort_fp32",
                             "mobilenetv2_int8_static_accuracy_drop", "minilm_int8_static_latency_b1_vs_int8_dynamic",
                             "minilm_int8_static_embedding_cosine", "serving_peak_rss_int8_minilm_mb"]
    assert all(isinstance(t["value"], float) for t in targets.values())
    # Correctness, not speed: every quick export matched PyTorch and every ONNX variant ran.
    assert targets["every_variant_exports_matches_and_runs"]["value"] == 1.0
    checks = doc["export_checks"]
    assert {(c["model"], c["precision"]) for c in checks} == {
        ("mobilenetv2", "fp32"), ("mobilenetv2", "int8-static"), ("mobilenetv2-pruned", "fp32"),
        ("mobilenetv2-pruned", "int8-static"), ("minilm-l6", "fp32"), ("minilm-l6-pruned", "fp32")}
    assert all(c["max_abs_diff"] <= 1e-4 for c in checks if c["precision"] == "fp32")
    minilm = {v["name"]: v for v in doc["minilm"]["variants"]}
    assert minilm["ort-int8-static"]["torch_imported"] is False
    assert minilm["ort-int8-static"]["accuracy"]["cosine_mean"] >= 0.99
    # PyTorch-native static int8 ran on both models, in the same runs as PyTorch fp32.
    summary = doc["pytorch_int8"]["summary"]
    measured = ["mobilenetv2_latency_b1_vs_torch_fp32", "mobilenetv2_accuracy_drop_pp", "minilm_latency_b1_vs_torch_fp32",
                "minilm_embedding_cosine", "mobilenetv2_latency_b1_vs_compiled_fp32"]
    assert all(isinstance(summary[k], float) for k in measured), summary
    assert summary["minilm_embedding_cosine"] >= 0.95
    pt2e = {v["name"]: v for v in doc["pytorch_int8"]["mobilenetv2"]["variants"]}
    assert pt2e["pt2e-int8"]["stages"] == ["quantize:pt2e_static_int8"] and pt2e["pt2e-int8"]["framework"] == "torch"
    if CHECK.exists():  # the shared checker reads the file (targets may be missed in a quick run)
        res = subprocess.run([sys.executable, str(CHECK), str(out)], capture_output=True, text=True)
        assert "Traceback" not in res.stderr, res.stderr
