"""benchmarks/parallel.py runs the self-check and every strategy on a small BERT in its quick mode."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "parallel.py"


@pytest.mark.multiprocess
def test_parallel_quick(tmp_path):
    out = tmp_path / "parallel.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)], capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "parallel" and doc["quick"] is True
    assert {"machine", "threads", "versions", "command", "git_commit"} <= set(doc)
    names = [t["name"] for t in doc["targets"]]
    assert "fsdp_2_ranks_state_vs_one_process_bert_base" in names and "equal_to_one_process_pipeline_1f1b_max_abs_diff" in names
    assert all(t["met"] for t in doc["targets"]), [t for t in doc["targets"] if not t["met"]]
    assert [(r["strategy"], r["processes"]) for r in doc["strategies"]] == [
        ("none", 1), ("fsdp", 1), ("ddp", 2), ("ddp+zero1", 2), ("fsdp", 2), ("fsdp bf16", 2), ("tp", 2),
        ("pipeline", 2)]
    # What each process holds: DDP the whole state, FSDP half of it.
    by = {(r["strategy"], r["processes"]): r["state_bytes_max"] for r in doc["strategies"]}
    assert by[("ddp", 2)] == by[("none", 1)] and by[("fsdp", 2)] <= 0.55 * by[("none", 1)]
