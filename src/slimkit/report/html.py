"""Render a run's ``metrics.json`` into one self-contained, offline ``report.html``.

This module assembles the page: it checks the schema version, gathers each section's
context and renders the Jinja template. The sections are built beside it:
:mod:`~slimkit.report.summary` (header facts, variants table, headline, targets),
:mod:`~slimkit.report.plots` (the main plots), :mod:`~slimkit.report.energy`,
:mod:`~slimkit.report.training` (distillation and supervised training),
:mod:`~slimkit.report.pruning` and :mod:`~slimkit.report.memory_profile`, on top of
:mod:`~slimkit.report.formatting` and :mod:`~slimkit.report.figures`. Names other code
imported from here before the split (``_label_offsets``, the colours, ``_png``, ...) are
re-exported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2

from slimkit.atomic import write_text
from slimkit.errors import SlimkitError
from slimkit.report.backends import _backends
from slimkit.report.energy import _energy
from slimkit.report.figures import COLOR_BASELINE, COLOR_OTHER, COLOR_OUTPUT, _no_data, _png
from slimkit.report.formatting import DASH, _date, _get, task_accuracy
from slimkit.report.memory_profile import MEMORY_COLORS, _memory_profile
from slimkit.report.plots import PLOT_IDS, _label_offsets, _plots
from slimkit.report.pruning import _pruning
from slimkit.report.summary import (
    _batch_sizes,
    _harness_rows,
    _headline,
    _summary_row,
    _target_rows,
    _task_rows,
    _text_rows,
)
from slimkit.report.training import _supervised, _training

__all__ = [
    "COLOR_BASELINE", "COLOR_OTHER", "COLOR_OUTPUT", "DASH", "MEMORY_COLORS", "PLOT_IDS", "SCHEMA_VERSION",
    "_label_offsets", "_no_data", "_png", "render_report", "task_accuracy",
]

SCHEMA_VERSION = 1


def render_report(metrics: dict[str, Any], path: str | Path) -> None:
    """Write the HTML report for one run.

    The file embeds its CSS, its plots (PNG data URIs) and a small self-check script,
    so it opens offline and can be mailed or archived on its own.

    Args:
        metrics: The run's metrics, as in ``metrics.json`` (schema version 1). Any
            numeric field may be null; ``targets`` may be absent; ``bench``, rows of
            ``slimkit bench`` on the run, adds a section on backends.
        path: Where to write the report; written atomically.

    Raises:
        SlimkitError: If ``metrics`` has a schema version this renderer does not know.
    """
    version = metrics.get("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise SlimkitError(
            f"metrics schema_version is {version!r}, but this slimkit renders version "
            f"{SCHEMA_VERSION}; render it with the slimkit version that wrote it."
        )
    write_text(path, _render(metrics))


def _render(metrics: dict[str, Any]) -> str:
    harness = metrics.get("harness") or {}
    variants = metrics.get("variants") or []
    baseline = metrics.get("baseline")
    batch_sizes = _batch_sizes(harness, variants)
    targets = metrics.get("targets")
    tables = ["summary-table", "energy-table"] + (["targets-table"] if targets else [])
    training = _training(variants, baseline, batch_sizes)
    supervised = _supervised(variants)
    plot_ids = list(PLOT_IDS)
    if training:
        tables.append("training-table")
        plot_ids.append(training["plot"]["id"])
    if supervised:
        tables.append("supervised-table")
        plot_ids.append(supervised["plot"]["id"])
    pruning = _pruning(variants)
    for section in pruning:
        tables.append(section["table_id"])
        plot_ids.append(section["plot"]["id"])
    backends = _backends(metrics.get("bench"))
    if backends:
        tables.append("backends-table")
        plot_ids.append(backends["plot"]["id"])
    memory = _memory_profile(metrics.get("memory_profile"))
    if memory:
        tables += ["memory-modules-table", "memory-tensors-table"]
        plot_ids.append(memory["plot"]["id"])

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("slimkit.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return env.get_template("report.html.j2").render(
        recipe=metrics.get("recipe") or "unnamed recipe",
        created=_date(metrics.get("created")),
        slimkit_version=metrics.get("slimkit_version") or DASH,
        baseline=baseline or DASH,
        headline=_headline(variants, baseline, batch_sizes),
        harness=_harness_rows(harness),
        versions=_text_rows(harness.get("versions")),
        task=_task_rows(metrics.get("task")),
        batch_sizes=batch_sizes,
        rows=[_summary_row(v, baseline, batch_sizes) for v in variants],
        plots=_plots(variants, baseline, batch_sizes),
        targets=_target_rows(targets) if targets else None,
        targets_met=sum(1 for t in targets or [] if t.get("met") is True),
        energy=_energy(variants),
        backends=backends,
        training=training,
        supervised=supervised,
        image_task=_get(metrics, "task", "kind") == "image",
        pruning=pruning,
        memory=memory,
        expected_plots=plot_ids,
        expected_tables=tables,
    )
