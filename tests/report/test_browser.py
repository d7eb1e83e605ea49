"""Open the rendered report in headless Chromium and read its own self-check."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from slimkit.report import render_report

pytestmark = pytest.mark.browser

SAMPLE = Path(__file__).with_name("sample_metrics.json")
PLOT_IDS = ["plot-latency", "plot-size", "plot-memory", "plot-accuracy", "plot-tradeoff"]
HINT = "run `make test` as root so the Makefile installs Debian's `chromium` package"


def find_chromium() -> str:
    found = shutil.which("chromium")
    if not found and Path("/usr/bin/chromium").exists():
        found = "/usr/bin/chromium"
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail(f"Chromium not found; {HINT}.")
    pytest.skip(f"Chromium not found; {HINT}.")


def chromium(tmp_path: Path, page: Path, *extra: str) -> str:
    """Run headless Chromium on ``page`` (offline, throwaway profile) and return stdout."""
    profile = tmp_path / "profile"
    profile.mkdir(exist_ok=True)
    cmd = [
        find_chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=5000",
        *extra,
        page.resolve().as_uri(),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"chromium exited {done.returncode}:\n{done.stderr[-2000:]}"
    return done.stdout


def selfcheck(dom: str) -> str | None:
    body = re.search(r"<body\b[^>]*>", dom)
    assert body, "no <body> in the dumped DOM"
    found = re.search(r'data-selfcheck="([^"]*)"', body.group(0))
    return found.group(1) if found else None


@pytest.fixture
def report(tmp_path: Path) -> Path:
    page = tmp_path / "report.html"
    render_report(json.loads(SAMPLE.read_text()), page)
    return page


def test_report_passes_its_self_check_in_chromium(report, tmp_path):
    dom = chromium(tmp_path, report, "--dump-dom")
    assert selfcheck(dom) == "ok"
    for plot_id in PLOT_IDS:
        assert f'id="{plot_id}"' in dom
    assert 'id="summary-table"' in dom
    assert 'id="targets-table"' in dom


def test_self_check_reports_a_broken_image(report, tmp_path):
    # Guards the guard: a corrupt plot must turn the self-check red.
    html = report.read_text(encoding="utf-8")
    html = re.sub(r'(id="plot-size" src="data:image/png;base64,)[^"]+', r"\1AAAA", html)
    report.write_text(html, encoding="utf-8")
    status = selfcheck(chromium(tmp_path, report, "--dump-dom"))
    assert status is not None and status.startswith("error:")
    assert "plot-size" in status


def test_screenshot_is_not_blank(report, tmp_path):
    shot = tmp_path / "shot.png"
    chromium(tmp_path, report, f"--screenshot={shot}", "--window-size=1280,2000")
    assert shot.is_file()
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(data) > 10_000


@pytest.mark.parametrize("section, ids", [
    ("with_training", ["plot-training", "training-table"]),
    ("with_pruning", ["plot-sensitivity-0", "pruning-table-0"]),
    ("with_backends", ["plot-backends", "backends-table"]),
])
def test_report_with_an_optional_section_passes_its_self_check(section, ids, tmp_path):
    import test_html

    page = tmp_path / "report.html"
    render_report(getattr(test_html, section)(json.loads(SAMPLE.read_text())), page)
    dom = chromium(tmp_path, page, "--dump-dom")
    assert selfcheck(dom) == "ok"
    for element in ids:
        assert f'id="{element}"' in dom
