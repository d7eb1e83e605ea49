"""benchmarks/deep_compression.py runs in its quick mode, writes its result, and resumes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "deep_compression.py"
STAGES = ["dense", "pruned", "pruned+quantized", "pruned+quantized+Huffman"]


def run(out: Path, work: Path, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--work", str(work),
                           "--threads", "1"], capture_output=True, text=True, timeout=timeout)


@pytest.mark.integration
def test_deep_compression_quick(tmp_path):
    if not Path("/usr/share/datasets/fashion-mnist").is_dir() and not os.environ.get("CI"):
        pytest.skip("needs the Debian package dataset-fashion-mnist (make test installs it as root)")
    out, work = tmp_path / "deep_compression.json", tmp_path / "work"
    proc = run(out, work, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "deep_compression" and doc["quick"] is True and doc["test_size"] == 10_000
    assert {"machine", "threads", "versions", "command", "git_commit"} <= set(doc)
    assert [t["name"] for t in doc["targets"]] == [
        "lenet_300_100_dense_test_accuracy", "lenet5_dense_test_accuracy", "lenet_300_100_compression_ratio",
        "lenet5_compression_ratio", "lenet_300_100_accuracy_drop", "lenet5_accuracy_drop"]
    assert all(isinstance(t["value"], float) for t in doc["targets"])
    rows = doc["table"]["rows"]
    assert [(r[0], r[1]) for r in rows] == [(n, s) for n in ("lenet_300_100", "lenet5") for s in STAGES]
    for name, net in doc["nets"].items():
        dense, pruned, quantized, coded = net["rows"]
        assert dense[2:7] == [100.0, 32.0, 0.0, net["dense_bytes"], 1.0]
        # Each stage is smaller than the one before; the last is the file on disk.
        assert dense[5] > pruned[5] > quantized[5] > coded[5] == net["file_bytes"]
        assert coded[6] == pytest.approx(net["dense_bytes"] / net["file_bytes"])
        assert set(net["bits"]) == set(net["keep"]) and all(2 <= b <= 8 for b in net["bits"].values())
        # The paper's per-layer rates, to the nearest weight.
        assert net["kept"] == {n: round(k * net["weights"][n]) for n, k in net["keep"].items()}, name
        # The decoded file is the model: same outputs, same test error as the quantized row.
        assert net["decoded_outputs_identical"] and coded[7] == quantized[7]
    # The file is chosen to fit the paper's ratio, whatever the (short) training reached.
    assert doc["nets"]["lenet_300_100"]["ratio"] >= 40 and doc["nets"]["lenet5"]["ratio"] >= 39

    # Every stage is kept: a second run trains nothing and gives the same result.
    again = run(out, work, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    redo = json.loads(out.read_text())
    assert redo["table"] == doc["table"]
    for name, net in redo["nets"].items():
        assert net["bit_choice"] == doc["nets"][name]["bit_choice"]
        assert net["finetune"] == doc["nets"][name]["finetune"]

    # A kept stage trained under other budgets is refused, by name, and the result file is left alone.
    record = work / "lenet_300_100" / "dense" / "result.json"
    kept = json.loads(record.read_text())
    kept["budgets"][0]["epochs"] += 1
    record.write_text(json.dumps(kept))
    refused = run(out, work, timeout=300)
    assert refused.returncode != 0
    assert f"{record.parent} was trained with other budgets" in refused.stderr
    assert json.loads(out.read_text()) == redo
