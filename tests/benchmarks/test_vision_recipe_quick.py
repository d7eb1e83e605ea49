"""benchmarks/vision_recipe.py runs the shipped MobileNetV2 recipe and a user CNN in its quick mode."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from slimkit.zoo.images import FASHION_MNIST_DIR

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "vision_recipe.py"
CHECK = ROOT.parent / "shared" / "check_targets.py"


@pytest.mark.integration
def test_vision_recipe_quick(tmp_path):
    if not FASHION_MNIST_DIR.is_dir() and not os.environ.get("SLIMKIT_FASHION_MNIST") and not os.environ.get("CI"):
        pytest.skip("needs the Debian package dataset-fashion-mnist (make test installs it as root)")
    out, work = tmp_path / "vision_recipe.json", tmp_path / "work"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--work", str(work)],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "vision_recipe" and doc["quick"] is True
    assert {"machine", "threads", "versions", "command", "git_commit"} <= set(doc)
    assert [t["name"] for t in doc["targets"]] == ["accuracy_drop_vs_finetuned_fp32",
                                                  "ort_int8_latency_b1_vs_unpruned_ort_fp32",
                                                  "same_recipe_runs_on_a_user_cnn"]
    assert all(isinstance(t["value"], float) for t in doc["targets"])
    # Only the model changed, and the user's CNN went through every stage of the recipe.
    assert {t["name"]: t["value"] for t in doc["targets"]}["same_recipe_runs_on_a_user_cnn"] == 1.0
    for run in ("mobilenetv2", "user-cnn"):
        metrics = json.loads((work / run / "metrics.json").read_text())
        assert metrics["task"]["kind"] == "image" and metrics["task"]["test_size"] == 200
        assert (work / run / "report.html").is_file()
    if CHECK.exists():  # the shared checker reads the file (targets may be missed in a quick run)
        res = subprocess.run([sys.executable, str(CHECK), str(out)], capture_output=True, text=True)
        assert res.returncode in (0, 1) and "targets met" in res.stdout
