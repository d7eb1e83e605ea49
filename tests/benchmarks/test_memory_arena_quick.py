"""The activation-arena benchmark runs in its quick mode and writes the shared format."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHECK = ROOT.parent / "shared" / "check_targets.py"


@pytest.mark.integration
def test_memory_arena_quick(tmp_path):
    out = tmp_path / "memory_arena.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memory_arena.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "memory_arena" and doc["quick"] is True and doc["threads"] == 1
    assert {"machine", "threads", "versions", "command", "git_commit"} <= set(doc)
    assert [t["name"] for t in doc["targets"]] == [
        "minilm_l6_seq128_arena_over_lower_bound", "mobilenet_v2_224_arena_over_lower_bound",
        "minilm_l6_activation_allocations_per_request", "mobilenet_v2_activation_allocations_per_request",
        "outputs_not_matching_eager"]
    assert all(isinstance(t["value"], (int, float)) for t in doc["targets"])
    assert [m["model"] for m in doc["models"]] == ["minilm-l6", "mobilenet-v2"]
    for m in doc["models"]:
        for b in m["target_buckets"]:
            assert 0 < b["lower_bound_bytes"] <= b["arena_bytes"] <= b["no_reuse_bytes"]
        assert set(m["peak_rss"]) == {"eager", "eager_after_trace", "arena", "onnxruntime"}
        assert m["peak_rss"]["onnxruntime"]["torch_imported"] is False
        assert all(v["peak_rss_bytes"] > 0 for v in m["peak_rss"].values())
        assert set(m["allocations_per_request"]["arena"]) == {"1", "2"}
        assert all(c["assert_close"] for c in m["outputs_vs_eager"])
    if CHECK.exists():  # the shared checker reads the file (targets may be missed in a quick run)
        res = subprocess.run([sys.executable, str(CHECK), str(out)], capture_output=True, text=True)
        assert res.returncode in (0, 1) and "targets met" in res.stdout
