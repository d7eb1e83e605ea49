"""Each benchmark script runs in its quick mode and writes a result in the shared format."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHECK = ROOT.parent / "shared" / "check_targets.py"


@pytest.mark.integration
def test_bert_int8_quick(tmp_path):
    out = tmp_path / "bert_int8.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bert_int8.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "bert_int8" and doc["quick"] is True
    assert {"machine", "threads", "versions", "command", "git_commit"} <= set(doc)
    names = [t["name"] for t in doc["targets"]]
    assert names == ["latency_b1_vs_fp32_eager", "latency_b1_vs_ort_dynamic_int8", "embedding_cosine_mean",
                     "frozen_head_accuracy_drop", "size_vs_fp32_safetensors", "peak_rss_vs_fp32_eager"]
    assert all(isinstance(t["value"], float) for t in doc["targets"])
    assert [v["name"] for v in doc["variants"]] == ["fp32", "slimkit-int8", "torch-dynamic-int8", "ort-fp32", "ort-dynamic-int8",
                                                  "slimkit-int8-fallback4"]
    if CHECK.exists():  # the shared checker reads the file (targets may be missed in a quick run)
        res = subprocess.run([sys.executable, str(CHECK), str(out)], capture_output=True, text=True)
        assert res.returncode in (0, 1) and "targets met" in res.stdout


def test_distill_hinton_without_the_dataset_says_how_to_install_it(tmp_path):
    env = {**os.environ, "SLIMKIT_FASHION_MNIST": str(tmp_path / "missing")}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "distill_hinton.py"), "--phase", "hard"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "does not exist; install the Debian package dataset-fashion-mnist" in proc.stderr


@pytest.mark.integration
def test_distill_hinton_quick(tmp_path):
    if not Path("/usr/share/datasets/fashion-mnist").is_dir() and not os.environ.get("CI"):
        pytest.skip("needs the Debian package dataset-fashion-mnist (make test installs it as root)")
    out = tmp_path / "distill_hinton.json"
    script = [sys.executable, str(ROOT / "benchmarks" / "distill_hinton.py"), "--quick", "--work", str(tmp_path / "work")]
    partial = subprocess.run([*script, "--seeds", "1"], capture_output=True, text=True)
    assert partial.returncode == 2 and "--seeds picks nets for --phase hard or distilled" in partial.stderr
    # One seed's hard-label net trained by a separate process is gathered by the full run.
    one = subprocess.run([*script, "--phase", "hard", "--seeds", "1"], capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    assert json.loads(one.stdout)["name"] == "small_hard_s1" and not out.exists()
    proc = subprocess.run([*script, "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["hard"][1] == json.loads(one.stdout) | {"val_curve": doc["hard"][1]["val_curve"]}
    assert list(doc["selection"]["teachers_best_val_accuracy"]) == ["teacher_flip_p0.5"]
    assert list(doc["selection"]["temperatures_best_val_accuracy"]) == ["small_distilled_flip_p0.5_T20_s0"]
    assert doc["benchmark"] == "distill_hinton" and doc["quick"] is True and doc["test_size"] == 10_000
    assert [t["name"] for t in doc["targets"]] == ["teacher_test_accuracy", "hard_label_small_net_test_accuracy",
                                                 "mean_error_reduction_d", "paired_t_statistic"]
    assert len(doc["hard"]) == len(doc["distilled"]) == 2
    # Trained nets are kept: a second run resumes from them instead of training again.
    again = subprocess.run([*script, "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0
    assert json.loads(out.read_text())["hard"] == doc["hard"]


@pytest.mark.integration
def test_distill_minilm_quick(tmp_path):
    out = tmp_path / "distill_minilm.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "distill_minilm.py"), "--quick", "--out", str(out),
                           "--work", str(tmp_path / "work")], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "distill_minilm" and doc["quick"] is True
    assert len(doc["targets"]) == 7 and all(isinstance(t["value"], float) for t in doc["targets"])
    assert [v["name"] for v in doc["variants"]] == ["fp32", "slimkit-int8", "student-fp32", "student-int8", "qat-int8"]
    assert doc["student"]["layers"] == [1, 3, 5] and doc["student"]["train_seconds"] > 0
