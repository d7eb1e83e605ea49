"""The report's memory-profile section: shown when the metrics carry a ``memory_profile``."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from slimkit.memory.profiler import profile
from slimkit.report import render_report

SAMPLE = Path(__file__).with_name("sample_metrics.json")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def memory_profile() -> dict:
    """A real profile of a training step of a tiny seeded MLP."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))
    batch = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
    return {"model": "tiny-mlp", **profile(model, batch, train=True).to_dict()}


def render(metrics: dict, tmp_path: Path) -> str:
    out = tmp_path / "report.html"
    render_report(metrics, out)
    return out.read_text(encoding="utf-8")


def with_profile(profile: dict) -> dict:
    metrics = json.loads(SAMPLE.read_text())
    metrics["memory_profile"] = profile
    return metrics


def section(html: str) -> str:
    return html[html.index("<h2>Memory profile</h2>"):html.index("<h2>Energy</h2>")]


def test_section_has_summary_plot_and_tables(memory_profile, tmp_path):
    html = render(with_profile(memory_profile), tmp_path)
    part = section(html)
    assert "one training step (forward, loss, backward, optimizer step) of tiny-mlp on cpu" in part
    assert "right after aten.div outside the model (optimizer)" in part
    assert "gradients 49.8 kB" in part and "optimizer state 99.6 kB" in part
    src = re.search(r'<img id="plot-memory-profile" src="data:image/png;base64,([^"]+)"', part).group(1)
    png = base64.b64decode(src, validate=True)
    assert png.startswith(PNG_MAGIC) and len(png) > 5_000
    modules = re.search(r'<table id="memory-modules-table">.*?</table>', part, re.S).group(0)
    rows = re.findall(r"<tr>\s*<td>(.*?)</td><td class=\"n\">(.*?)</td>", modules)
    assert rows == [("2", "1"), ("0", "1"), ("1", "1")]  # the output is still live at the peak
    assert "Backward temporaries" in modules
    tensors = re.search(r'<table id="memory-tensors-table">.*?</table>', part, re.S).group(0)
    assert "0.weight.exp_avg" in tensors and "128×64" in tensors and "(before the step)" in tensors
    # The page's self-check expects the new plot and tables.
    assert '"plot-memory-profile"' in html and '"memory-modules-table"' in html and '"memory-tensors-table"' in html


def test_no_section_without_a_profile(tmp_path):
    html = render(json.loads(SAMPLE.read_text()), tmp_path)
    assert "Memory profile" not in html and "plot-memory-profile" not in html and "memory-modules-table" not in html


def test_forward_profile_has_no_backward_column(memory_profile, tmp_path):
    torch.manual_seed(0)
    forward = profile(nn.Sequential(nn.Linear(8, 8), nn.ReLU()), torch.ones(2, 8)).to_dict()
    html = render(with_profile(forward), tmp_path)
    assert "one forward pass (eval mode, no grad)" in section(html)
    assert "Backward temporaries" not in section(html)


def test_broken_profile_renders_with_dashes(memory_profile, tmp_path):
    broken = json.loads(json.dumps(memory_profile))
    broken["peak"] = {"bytes": None, "op": None, "module": "<b>odd</b>", "by_category": {"activations": None}}
    broken["timeline"] = None
    broken["modules"] = [{"module": None, "tensors": None}, "not a row"]
    broken["largest"] = [{"bytes": "many", "shape": None}]
    broken["allocator"] = {"peak_allocated_bytes": 5e9, "peak_reserved_bytes": None}
    html = render(with_profile(broken), tmp_path)
    part = section(html)
    assert "None" not in part and "<b>odd</b>" not in part and "&lt;b&gt;odd&lt;/b&gt;" in part
    assert "own peak was 5.0 GB allocated and — reserved" in part
    src = re.search(r'<img id="plot-memory-profile" src="data:image/png;base64,([^"]+)"', part).group(1)
    assert base64.b64decode(src).startswith(PNG_MAGIC)  # a "no data" plot


@pytest.mark.browser
def test_report_with_a_memory_profile_passes_its_self_check_in_chromium(memory_profile, tmp_path):
    from test_browser import chromium, selfcheck

    page = tmp_path / "report.html"
    render_report(with_profile(memory_profile), page)
    dom = chromium(tmp_path, page, "--dump-dom")
    assert selfcheck(dom) == "ok"
    assert 'id="plot-memory-profile"' in dom and 'id="memory-modules-table"' in dom
