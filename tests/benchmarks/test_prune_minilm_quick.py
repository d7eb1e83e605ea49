"""benchmarks/prune_minilm.py runs in its quick mode, writes its result, and resumes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "prune_minilm.py"
TARGETS = ["heads_removed_fraction", "ffn_removed_fraction", "pruned_recovered_accuracy_drop",
           "pruned_recovered_latency_b1_vs_fp32", "pruned_recovered_int8_latency_b1_vs_fp32",
           "pruned_recovered_int8_accuracy_drop"]


def run(out: Path, work: Path, timeout: int) -> subprocess.CompletedProcess:
    # The shape is given, so the quick run skips the timing of candidate shapes.
    return subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--work", str(work),
                           "--threads", "1", "--heads", "0.5", "--ffn", "0.5"],
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.integration
def test_prune_minilm_quick(tmp_path):
    out, work = tmp_path / "prune_minilm.json", tmp_path / "work"
    proc = run(out, work, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "prune_minilm" and doc["quick"] is True
    assert {"machine", "threads", "versions", "command", "git_commit"} <= set(doc)
    assert [t["name"] for t in doc["targets"]] == TARGETS
    by = {t["name"]: t["value"] for t in doc["targets"]}
    # Half of MiniLM's 72 heads and 9,216 FFN neurons are gone, and the model says so.
    assert by["heads_removed_fraction"] == 0.5 and by["ffn_removed_fraction"] == 0.5
    assert sum(doc["pruning"]["heads_kept_per_layer"]) == 36 and sum(doc["pruning"]["ffn_kept_per_layer"]) == 4608
    assert doc["pruning"]["parameters"]["pruned"] < doc["pruning"]["parameters"]["unpruned"]
    assert len(doc["pilot"]["candidates"]) == 5
    assert [r[0] for r in doc["table"]["rows"]] == ["fp32", "ort-dynamic-int8", "pruned-fp32", "pruned-recovered-fp32",
                                                   "pruned-recovered-int8"]
    # Every phase kept its record: a second run trains nothing and writes the same pruning.
    again = run(out, work, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(out.read_text())["pruning"] == doc["pruning"]
