"""benchmarks/prune_mobilenetv2.py runs in its quick mode, writes the shared result format, and resumes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from slimkit.zoo.images import FASHION_MNIST_DIR

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "prune_mobilenetv2.py"
CHECK = ROOT.parent / "shared" / "check_targets.py"


def run_quick(out: Path, work: Path, timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--work", str(work), "--threads", "1"],
                          capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.integration
def test_prune_mobilenetv2_quick(tmp_path):
    if not FASHION_MNIST_DIR.is_dir() and not os.environ.get("SLIMKIT_FASHION_MNIST") and not os.environ.get("CI"):
        pytest.skip("needs the Debian package dataset-fashion-mnist (make test installs it as root)")
    out, work = tmp_path / "prune_mobilenetv2.json", tmp_path / "work"
    proc = run_quick(out, work, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "prune_mobilenetv2" and doc["quick"] is True and doc["threads"] == 1
    assert {"machine", "versions", "command", "git_commit"} <= set(doc)
    assert [t["name"] for t in doc["targets"]] == ["finetuned_test_accuracy", "macs_ratio", "ort_latency_ratio", "accuracy_drop"]
    assert all(isinstance(t["value"], float) for t in doc["targets"])
    assert doc["label_names"][9] == "Ankle boot" and doc["test_size"] == 500

    # The plan meets the MACs budget exactly as predicted, with every width a multiple of 8,
    # and the classifier's outputs untouched.
    macs = {t["name"]: t["value"] for t in doc["targets"]}["macs_ratio"]
    assert macs <= 0.6 and macs == pytest.approx(doc["plan"]["predicted_macs_ratio"], abs=1e-12)
    assert doc["widths_multiple_of_8"] and all(kept % 8 == 0 and kept <= size for size, kept in doc["widths"].values())
    assert any(kept < size for size, kept in doc["widths"].values())
    assert doc["plan"]["importance"] == "taylor" and doc["plan"]["method"] == "sensitivity"
    assert doc["pruned"]["params"] < doc["unpruned"]["params"]

    # Both ONNX exports match PyTorch, and the pruned one is timed in the same process.
    lat = doc["latency"]
    assert set(lat["variants"]) == {"unpruned", "pruned"} and lat["threads"] == 1
    assert max(lat["onnx_max_abs_diff_vs_torch"].values()) < 1e-3
    assert 0 < lat["ratio"] < 1.0

    # The ImageNet check: the photographs scikit-learn ships at least, a ladder ending at the plan.
    check = doc["imagenet_check"]
    assert check["photos"] >= 2 and check["views"] == 10 * check["photos"]
    assert [r["fraction_of_plan_ratios"] for r in check["ladder"]] == [0.25, 0.5, 1.0]
    assert check["macs_ratio_224"] == pytest.approx(macs, abs=0.02)
    assert 0.0 <= check["top1_agreement_views"] <= 1.0

    # Step times are measured, and the full run's duration is estimated from them.
    assert doc["finetune"]["train_seconds_per_image"] > 0 and doc["recover"]["train_seconds_per_image"] > 0
    assert doc["full_run_estimate"]["total_minutes"] > 0

    if CHECK.exists():  # the shared checker reads the file (a quick run misses accuracy targets)
        res = subprocess.run([sys.executable, str(CHECK), str(out)], capture_output=True, text=True)
        assert res.returncode in (0, 1) and "targets met" in res.stdout

    # Trained stages are kept: a second run resumes from them instead of training again.
    again = run_quick(out, work, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    redo = json.loads(out.read_text())
    assert redo["finetune"] == doc["finetune"] and redo["recover"] == doc["recover"] and redo["plan"] == doc["plan"]
