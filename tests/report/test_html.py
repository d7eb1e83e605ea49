"""The HTML report: self-contained, every plot embedded, nulls shown as a dash."""

from __future__ import annotations

import base64
import copy
import json
import re
from pathlib import Path

import pytest

from slimkit.errors import SlimkitError
from slimkit.report import render_report

SAMPLE = Path(__file__).with_name("sample_metrics.json")
PLOT_IDS = ["plot-latency", "plot-size", "plot-memory", "plot-accuracy", "plot-tradeoff"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def metrics() -> dict:
    return json.loads(SAMPLE.read_text())


def render(metrics: dict, tmp_path: Path) -> str:
    out = tmp_path / "report.html"
    render_report(metrics, out)
    assert out.is_file()
    return out.read_text(encoding="utf-8")


def img_src(html: str, plot_id: str) -> str:
    tags = re.findall(rf'<img[^>]*\bid="{plot_id}"[^>]*>', html)
    assert len(tags) == 1, f"{plot_id}: expected one <img>, found {len(tags)}"
    src = re.search(r'\bsrc="([^"]*)"', tags[0])
    assert src, f"{plot_id} has no src"
    return src.group(1)


def test_sample_renders_every_plot_as_embedded_png(metrics, tmp_path):
    html = render(metrics, tmp_path)
    for plot_id in PLOT_IDS:
        assert html.count(f'id="{plot_id}"') == 1
        src = img_src(html, plot_id)
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix)
        png = base64.b64decode(src[len(prefix):], validate=True)
        assert png.startswith(PNG_MAGIC)
        assert len(png) > 5_000, f"{plot_id} is suspiciously small"
    # Each plot sits in its own figure with a caption.
    assert html.count("<figure") == len(PLOT_IDS)
    assert html.count("<figcaption>") == len(PLOT_IDS)


def test_summary_table_lists_every_variant_and_marks_the_output(metrics, tmp_path):
    html = render(metrics, tmp_path)
    table = re.search(r'<table id="summary-table">.*?</table>', html, re.S)
    assert table, "summary table missing"
    rows = re.findall(r"<tr[^>]*>.*?</tr>", table.group(0), re.S)[1:]  # skip the header
    assert len(rows) == len(metrics["variants"])
    for row, variant in zip(rows, metrics["variants"], strict=True):
        assert f"<strong>{variant['name']}</strong>" in row
        assert variant["framework"] in row
        assert ('class="output"' in row) == variant["is_output"]
    output = next(r for r in rows if 'class="output"' in r)
    # slimkit-int8 in the sample: size, latency and accuracy, formatted.
    for expected in ["23.3", "0.26×", "7.6", "7.3–8.4", "0.30×", "163.6", "75.3%", "0.27 pp"]:
        assert expected in output, expected


def test_header_targets_and_energy(metrics, tmp_path):
    html = render(metrics, tmp_path)
    assert "minilm-int8-demo" in html
    assert "2026-11-22 03:00 UTC" in html
    for fact in ["rt-polarity", "10,246", "2,562", "AMD EPYC 7B13", "2.13.0", "1.31.1"]:
        assert fact in html, fact
    targets = re.search(r'<table id="targets-table">.*?</table>', html, re.S)
    assert targets, "targets table missing"
    assert targets.group(0).count("✓ met") == 3
    assert targets.group(0).count("✗ missed") == 1
    assert "analytical estimate" in html
    assert "Horowitz, ISSCC 2014, 45 nm" in html
    assert "Measured (mJ)" not in html  # no variant measured energy


def test_measured_energy_is_shown_when_present(metrics, tmp_path):
    metrics["variants"][4]["energy"]["measured"] = {"mj_per_inference": 12.345, "counter": "RAPL package"}
    html = render(metrics, tmp_path)
    assert "Measured (mJ)" in html
    assert "12.3" in html


def test_without_targets_there_is_no_targets_table(metrics, tmp_path):
    del metrics["targets"]
    html = render(metrics, tmp_path)
    assert 'id="targets-table"' not in html
    assert '"targets-table"' not in html  # nor does the self-check expect it


def test_report_references_nothing_on_the_network(metrics, tmp_path):
    html = render(metrics, tmp_path)
    lowered = html.lower()
    assert 'src="http' not in lowered
    assert 'href="http' not in lowered
    assert "http://" not in lowered
    assert "https://" not in lowered
    assert "@import" not in lowered
    assert "<link" not in lowered


def test_null_fields_render_as_dash(metrics, tmp_path):
    broken = copy.deepcopy(metrics)
    variant = broken["variants"][1]
    variant["size_bytes"] = None
    variant["size_ratio"] = None
    variant["peak_rss_bytes"] = None
    variant["rss_ratio"] = None
    variant["latency"]["8"] = {k: None for k in variant["latency"]["8"]}
    variant["accuracy"] = {k: None for k in variant["accuracy"]}
    variant["energy"]["estimate_mj"] = None
    broken["variants"][2]["accuracy"] = None
    broken["variants"][3]["latency"]["1"] = None
    broken["harness"]["machine"]["cores"] = None
    broken["task"]["test_size"] = None
    broken["targets"][0]["value"] = None
    broken["targets"][0]["met"] = None

    html = render(broken, tmp_path)
    assert "None" not in html
    table = re.search(r'<table id="summary-table">.*?</table>', html, re.S).group(0)
    row = re.findall(r"<tr[^>]*>.*?</tr>", table, re.S)[2]
    assert "torch-dynamic-int8" in row
    assert row.count("—") >= 10
    # Plots still render; variants missing a coordinate are named in the caption.
    for plot_id in PLOT_IDS:
        assert img_src(html, plot_id).startswith("data:image/png;base64,")
    assert "Not plotted (missing latency or accuracy): torch-dynamic-int8, ort-fp32" in html


def test_all_plots_render_even_with_no_data(metrics, tmp_path):
    for variant in metrics["variants"]:
        variant["latency"] = {}
        variant["accuracy"] = None
        variant["size_bytes"] = None
        variant["peak_rss_bytes"] = None
    html = render(metrics, tmp_path)
    assert "None" not in html
    for plot_id in PLOT_IDS:
        png = base64.b64decode(img_src(html, plot_id).split(",", 1)[1])
        assert png.startswith(PNG_MAGIC)


def test_names_are_html_escaped(metrics, tmp_path):
    metrics["recipe"] = "<script>alert(1)</script>"
    html = render(metrics, tmp_path)
    assert "<script>alert(1)</script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_write_is_atomic_and_leaves_no_temp_files(metrics, tmp_path):
    out = tmp_path / "report.html"
    out.write_text("old report")
    render_report(metrics, str(out))  # str paths work too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


def test_interrupted_write_keeps_the_previous_report(metrics, tmp_path, monkeypatch):
    out = tmp_path / "report.html"
    out.write_text("old report")

    def crash_halfway(self: Path, data: bytes) -> int:
        with open(self, "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_bytes", crash_halfway)
    with pytest.raises(OSError, match="disk full"):
        render_report(metrics, out)
    assert out.read_text() == "old report"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]


def test_unknown_schema_version_is_refused(metrics, tmp_path):
    metrics["schema_version"] = 2
    with pytest.raises(SlimkitError, match="schema_version"):
        render_report(metrics, tmp_path / "report.html")
    assert list(tmp_path.iterdir()) == []


def test_labels_of_close_points_do_not_share_a_place():
    from slimkit.report.html import _label_offsets

    offsets = _label_offsets([(0.30, 1.0), (0.31, 0.95), (0.9, 0.0), (0.305, 0.97)])
    assert offsets[0] != offsets[1] and len({offsets[0], offsets[1], offsets[3]}) == 3
    assert offsets[2] == offsets[0]  # a point far from the others keeps the default place


def with_training(metrics: dict) -> dict:
    """The sample with its output variant distilled (a training record as the runner writes it)."""
    out = copy.deepcopy(metrics)
    record = json.loads(SAMPLE.with_name("sample_training.json").read_text())
    next(v for v in out["variants"] if v["is_output"])["training"] = record
    return out


def test_distilled_variant_gets_a_teacher_student_table_and_curves(metrics, tmp_path):
    html = render(with_training(metrics), tmp_path)
    table = re.search(r'<table id="training-table">.*?</table>', html, re.S).group(0)
    rows = re.findall(r"<tr[^>]*>\s*<td>(.*?)</td><td>(.*?)</td>", table)
    assert rows == [("fp32", "teacher"), ("slimkit-int8", "student: layers [1, 3, 5], from the teacher")]
    assert "0.8123" in table and "0.9412" in table and "10.2" in table  # cosine before/after, minutes
    assert "17,389,440" in table and "22,713,216" in table
    assert base64.b64decode(img_src(html, "plot-training").split(",", 1)[1]).startswith(PNG_MAGIC)
    expected = json.loads(re.search(r"(\[[^\]]*\])\.forEach\(function \(id\) \{\s*var el = document.getElementById\(id\);\s*if \(!el \|\| el.tagName !== \"IMG\"", html).group(1))
    assert "plot-training" in expected


def test_teacher_student_from_scratch_and_distilled_student_in_one_table(metrics, tmp_path):
    out = with_training(metrics)
    (record,) = next(v for v in out["variants"] if v["is_output"])["training"]
    for e, acc in zip(record["evals"], [0.70, 0.74, 0.76], strict=True):
        e["val_accuracy"] = acc  # the task metric, as a stage with labelled texts records it
    record["before"]["val_accuracy"] = 0.61
    scratch = copy.deepcopy(record)
    scratch["student"]["init"] = "random"
    next(v for v in out["variants"] if v["name"] == "ort-dynamic-int8")["training"] = [scratch]
    html = render(out, tmp_path)
    table = re.search(r'<table id="training-table">.*?</table>', html, re.S).group(0)
    rows = re.findall(r"<tr[^>]*>\s*<td>(.*?)</td><td>(.*?)</td>", table)
    assert rows == [("fp32", "teacher"), ("ort-dynamic-int8", "student: layers [1, 3, 5], from scratch"),
                    ("slimkit-int8", "student: layers [1, 3, 5], from the teacher")]
    png = base64.b64decode(img_src(html, "plot-training").split(",", 1)[1])
    width = int.from_bytes(png[16:20], "big")  # the IHDR chunk: three panels are wider than two
    (tmp_path / "b").mkdir()
    without_task = base64.b64decode(img_src(render(with_training(metrics), tmp_path / "b"), "plot-training").split(",", 1)[1])
    assert width > 1.3 * int.from_bytes(without_task[16:20], "big")
    assert "accuracy of a frozen head" in html


def test_no_training_section_without_training(metrics, tmp_path):
    html = render(metrics, tmp_path)
    assert 'id="training-table"' not in html and "plot-training" not in html


def with_pruning(metrics: dict) -> dict:
    """The sample with its output variant pruned to a budget (an analysis as the runner records it)."""
    out = copy.deepcopy(metrics)
    sens = {"baseline": 1.0, "ratios": [0.5], "higher_is_better": True, "importance": "l1", "round_to": 1,
            "min_channels": 1, "groups": {"layer0.heads": {"size": 12, "kept": [6], "metric": [0.97]},
                                          "layer0.ffn": {"size": 1536, "kept": [768], "metric": [0.99]}}}
    choice = {"ratios": {"layer0.ffn": 0.5}, "kept": {"layer0.ffn": 768}, "cost": 20_000_000,
              "budget": 20_441_894.4, "total": 22_713_216, "kind": "params", "metric_loss": 0.01}
    record = {"stage": 0, "kind": "sensitivity", "metric": "embedding cosine to the unpruned model (calibration data)",
              "sensitivity": sens, "choice": choice}
    next(v for v in out["variants"] if v["is_output"])["pruning"] = [record]
    return out


def test_budget_pruned_variant_gets_a_sensitivity_plot_and_the_kept_groups(metrics, tmp_path):
    html = render(with_pruning(metrics), tmp_path)
    assert "<h2>Pruning sensitivity: slimkit-int8</h2>" in html
    assert "keeps 20,000,000 of 22,713,216 parameters" in html
    table = re.search(r'<table id="pruning-table-0">.*?</table>', html, re.S).group(0)
    assert re.findall(r"<td>(layer0\.\w+)</td><td class=\"n\">([\d,]+)</td><td class=\"n\">([\d,]+)</td>", table) == [
        ("layer0.heads", "12", "12"), ("layer0.ffn", "1,536", "768")]
    assert base64.b64decode(img_src(html, "plot-sensitivity-0").split(",", 1)[1]).startswith(PNG_MAGIC)
    assert "Pruning sensitivity" not in render(metrics, tmp_path)


def test_device_estimates_are_columns_of_the_energy_table(metrics, tmp_path):
    for v in metrics["variants"]:
        v["energy"]["devices"] = [
            {"device": "raspberry-pi-5", "estimate": True, "latency_ms": 123.4, "energy_mj": 555.5, "bound": "compute"},
            {"device": "jetson-orin-nx-16gb", "estimate": True, "latency_ms": 2.5, "energy_mj": 37.5, "bound": "memory"}]
    metrics["variants"][0]["energy"]["devices"] = metrics["variants"][0]["energy"]["devices"][:1]
    html = render(metrics, tmp_path)
    table = re.search(r'<table id="energy-table">.*?</table>', html, re.S).group(0)
    assert table.index("raspberry-pi-5, estimated (ms / mJ)") < table.index("jetson-orin-nx-16gb, estimated (ms / mJ)")
    assert table.count("123.4 / 555.5") == len(metrics["variants"]) and table.count("2.5 / 37.5") == len(metrics["variants"]) - 1
    assert "The device columns are <strong>estimates</strong>" in html


def test_no_device_columns_without_device_estimates(metrics, tmp_path):
    assert "estimated (ms / mJ)" not in render(metrics, tmp_path)


def with_backends(metrics: dict) -> dict:
    """The sample run after ``slimkit bench``, with device estimates in its energy records."""
    rows = [{"variant": v, "backend": b, "threads": t, "batch": 1, "median_ms": m * t ** -0.5, "p10_ms": m * 0.9 * t ** -0.5,
             "p90_ms": m * 1.1 * t ** -0.5, "throughput_per_s": 1000 / m, "ratio_to_reference": m / 30.0}
            for v, b, m in [("fp32", "torch", 30.0), ("fp32", "ort", 20.0), ("slimkit-int8", "ort", 8.0)] for t in (1, 2)]
    for v in metrics["variants"]:
        v["energy"]["devices"] = [{"device": "raspberry-pi-5", "latency_ms": 80.0, "energy_mj": 400.0, "bound": "compute"}]
    return {**metrics, "bench": {"reference": "fp32/torch", "rounds": 5, "iters": 10, "warmup": 3, "rows": rows}}


def test_the_backends_section_shows_every_row(metrics, tmp_path):
    html = render(with_backends(metrics), tmp_path)
    table = re.search(r'<table id="backends-table">.*?</table>', html, re.S).group(0)
    assert table.count("<tr>") == 1 + 6 and "<td>slimkit-int8</td><td>ort</td>" in table
    assert img_src(html, "plot-backends").startswith("data:image/png;base64,")
    assert "ratios are to fp32/torch" in html
