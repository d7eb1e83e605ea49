"""benchmarks/memory_shared.py runs in its quick mode and writes a result in the shared format."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHECK = ROOT.parent / "shared" / "check_targets.py"
TARGETS = ["shared_vs_private_pss_ratio", "shared_minus_noweights_pss_vs_weights", "store_three_models_disk_vs_one",
           "store_three_models_memory_vs_one", "concurrent_writers_corrupt_objects"]


@pytest.mark.integration
def test_memory_shared_quick(tmp_path):
    out = tmp_path / "memory_shared.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memory_shared.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=1800, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "memory_shared" and doc["quick"] is True
    assert {"machine", "threads", "versions", "command", "git_commit"} <= set(doc)
    assert [t["name"] for t in doc["targets"]] == TARGETS
    assert all(isinstance(t["value"], float) for t in doc["targets"])
    p = doc["processes"]
    assert p["processes"] == 2 and p["outputs_agree"]
    # Even the small model's weights are resident once: the shared processes' shares of
    # the file add up to one copy, while each has all of it mapped.
    shared = p["modes"]["shared"]
    assert abs(shared["weights_file_pss_total_bytes"] - p["weights_bytes"]) <= 0.02 * p["weights_bytes"]
    assert min(shared["weights_file_rss_bytes"]) >= 0.98 * p["weights_bytes"]
    assert p["modes"]["private"]["weights_file_pss_total_bytes"] == 0
    # The store's targets hold in the quick run too: the models are the real minilm-l6.
    met = {t["name"]: t["met"] for t in doc["targets"]}
    assert met["store_three_models_disk_vs_one"] and met["store_three_models_memory_vs_one"]
    assert doc["concurrent_writers"]["corrupt_objects"] == 0 and doc["store"]["stats"]["objects"] > 100
    if CHECK.exists():  # the shared checker reads the file (process targets may be missed in a quick run)
        res = subprocess.run([sys.executable, str(CHECK), str(out)], capture_output=True, text=True)
        assert res.returncode in (0, 1) and "targets met" in res.stdout
