"""Render a run's ``metrics.json`` into one self-contained, offline ``report.html``."""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from matplotlib import rc_context
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from slimkit.atomic import write_text
from slimkit.errors import SlimkitError
from slimkit.memory.timeline import CATEGORIES, format_bytes, module_label

SCHEMA_VERSION = 1
DASH = "—"
PLOT_IDS = ("plot-tradeoff", "plot-latency", "plot-size", "plot-memory", "plot-accuracy")

# The output variant is the one colour that stands out; the rest stay quiet.
COLOR_OUTPUT = "#e07b00"
COLOR_BASELINE = "#8c8c8c"
COLOR_OTHER = "#6b8fb5"

_OPS = {"<=": "≤", ">=": "≥", "<": "<", ">": ">", "==": "="}
_RC = {
    "font.size": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.titlesize": 10,
    "axes.titleweight": "bold",
}


def render_report(metrics: dict[str, Any], path: str | Path) -> None:
    """Write the HTML report for one run.

    The file embeds its CSS, its plots (PNG data URIs) and a small self-check script,
    so it opens offline and can be mailed or archived on its own.

    Args:
        metrics: The run's metrics, as in ``metrics.json`` (schema version 1). Any
            numeric field may be null; ``targets`` may be absent.
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
        training=training,
        supervised=supervised,
        image_task=_get(metrics, "task", "kind") == "image",
        pruning=pruning,
        memory=memory,
        expected_plots=plot_ids,
        expected_tables=tables,
    )


# --- formatting ------------------------------------------------------------------------


def _num(value: Any) -> float | None:
    """``value`` as a finite float, or None when it is missing or not a number."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _fmt(value: Any, spec: str = "{:.1f}", scale: float = 1.0) -> str:
    number = _num(value)
    return DASH if number is None else spec.format(number * scale)


def _mb(value: Any) -> str:
    return _fmt(value, "{:,.1f} MB", 1e-6)


def _pct(value: Any) -> str:
    return _fmt(value, "{:.1f}%", 100.0)


def _ratio(value: Any) -> str:
    return _fmt(value, "{:.2f}×")


def _text(value: Any) -> str:
    return DASH if value is None or value == "" else str(value)


def _get(mapping: Any, *keys: Any) -> Any:
    """Follow ``keys`` into nested dicts; None as soon as a level is missing."""
    for key in keys:
        if not isinstance(mapping, dict):
            return None
        mapping = mapping.get(key)
    return mapping


def _date(created: Any) -> str:
    if not created:
        return DASH
    try:
        # Python 3.10's fromisoformat does not accept the "Z" suffix.
        moment = datetime.fromisoformat(str(created).replace("Z", "+00:00"))
    except ValueError:
        return str(created)
    zone = " UTC" if moment.utcoffset() is not None and not moment.utcoffset() else ""
    return moment.strftime("%Y-%m-%d %H:%M") + zone


# --- tables ----------------------------------------------------------------------------


def _batch_sizes(harness: dict[str, Any], variants: list[dict[str, Any]]) -> list[int]:
    sizes = harness.get("batch_sizes")
    if sizes:
        return [int(b) for b in sizes]
    found = {int(b) for v in variants for b in (v.get("latency") or {})}
    return sorted(found)


def _harness_rows(harness: dict[str, Any]) -> list[tuple[str, str]]:
    machine = harness.get("machine") or {}
    batches = harness.get("batch_sizes")
    return [
        ("Device", _text(harness.get("device"))),
        ("Threads", _text(harness.get("threads"))),
        ("Sequence length", _text(harness.get("seq_len"))),
        ("Batch sizes", ", ".join(str(b) for b in batches) if batches else DASH),
        ("Rounds × iters", f"{_text(harness.get('rounds'))} × {_text(harness.get('iters'))}"),
        ("Warm-up calls", _text(harness.get("warmup"))),
        ("CPU", f"{_text(machine.get('cpu'))} ({_text(machine.get('cores'))} cores)"),
        ("Platform", _text(machine.get("platform"))),
    ]


def _text_rows(mapping: Any) -> list[tuple[str, str]]:
    return [(str(k), _text(v)) for k, v in (mapping or {}).items()]


def _task_rows(task: Any) -> list[tuple[str, str]]:
    task = task or {}
    return [
        ("Task", _text(task.get("name"))),
        ("Train examples", _fmt(task.get("train_size"), "{:,.0f}")),
        ("Test examples", _fmt(task.get("test_size"), "{:,.0f}")),
    ]


def task_accuracy(v: dict[str, Any]) -> tuple[Any, Any]:
    """A variant's task accuracy and its drop from the baseline in points: top-1 for an
    image classifier, the frozen head's for a text encoder."""
    acc = v.get("accuracy") or {}
    if "top1" in acc:
        return acc.get("top1"), acc.get("top1_drop_pp")
    return acc.get("frozen_head"), acc.get("frozen_head_drop_pp")


def _accuracy_name(variants: list[dict[str, Any]]) -> str:
    return "Top-1 accuracy" if any("top1" in (v.get("accuracy") or {}) for v in variants) else "Frozen-head accuracy"


def _summary_row(v: dict[str, Any], baseline: str | None, batch_sizes: list[int]) -> dict:
    acc = v.get("accuracy") or {}
    accuracy, drop = task_accuracy(v)
    latency = v.get("latency") or {}
    lat_cells = []
    for b in batch_sizes:
        lat = latency.get(str(b)) or {}
        p10, p90 = _num(lat.get("p10_ms")), _num(lat.get("p90_ms"))
        lat_cells.append({
            "median": _fmt(lat.get("median_ms")),
            "spread": DASH if p10 is None or p90 is None else f"{p10:.1f}–{p90:.1f}",
            "ratio": _ratio(lat.get("ratio_to_baseline")),
        })
    return {
        "name": _text(v.get("name")),
        "framework": _text(v.get("framework")),
        "is_output": bool(v.get("is_output")),
        "is_baseline": baseline is not None and v.get("name") == baseline,
        "size": _fmt(v.get("size_bytes"), "{:,.1f}", 1e-6),
        "size_ratio": _ratio(v.get("size_ratio")),
        "latency": lat_cells,
        "throughput": [
            _fmt(_get(latency, str(b), "throughput_per_s")) for b in batch_sizes if b > 1
        ],
        "rss": _fmt(v.get("peak_rss_bytes"), "{:,.1f}", 1e-6),
        "rss_ratio": _ratio(v.get("rss_ratio")),
        "frozen": _pct(accuracy),
        "drop": _fmt(drop, "{:.2f} pp"),
        "agreement": _pct(acc.get("agreement")),
        "refit": _pct(acc.get("refit")),
        "cos_mean": _fmt(acc.get("cosine_mean"), "{:.4f}"),
        "cos_min": _fmt(acc.get("cosine_min"), "{:.4f}"),
        "nn": _pct(acc.get("nn_agreement")),
        "energy": _fmt(_get(v, "energy", "estimate_mj")),
    }


def _headline(variants: list[dict], baseline: str | None, batch_sizes: list[int]) -> str | None:
    """One sentence on the output variant against the baseline, or None if there is none."""
    out = next((v for v in variants if v.get("is_output")), None)
    if out is None or not baseline:
        return None
    parts = []
    if batch_sizes:
        b = batch_sizes[0]
        lat = _get(out, "latency", str(b), "ratio_to_baseline")
        parts.append(f"{_ratio(lat)} latency at batch {b}")
    parts.append(f"{_ratio(out.get('size_ratio'))} size")
    parts.append(f"{_ratio(out.get('rss_ratio'))} peak memory")
    drop = _fmt(task_accuracy(out)[1], "{:.2f} pp")
    parts.append(f"{'top-1' if 'top1' in (out.get('accuracy') or {}) else 'frozen-head'} accuracy drop {drop}")
    return f"{_text(out.get('name'))} vs {baseline}: " + ", ".join(parts) + "."


def _target_rows(targets: list[dict[str, Any]]) -> list[dict[str, str]]:
    rows = []
    for t in targets:
        unit = t.get("unit") or ""
        op = t.get("op") or ""
        rows.append({
            "name": _text(t.get("name")),
            "value": _with_unit(t.get("value"), unit),
            "target": f"{_OPS.get(op, op)} {_with_unit(t.get('threshold'), unit)}".strip(),
            "status": {True: "met", False: "missed"}.get(t.get("met"), "unknown"),
        })
    return rows


def _with_unit(value: Any, unit: str) -> str:
    if _num(value) is None:
        return DASH
    if unit == "x":
        return _ratio(value)
    return f"{_fmt(value, '{:.3g}')} {unit}".strip()


def _energy(variants: list[dict[str, Any]]) -> dict[str, Any]:
    rows = []
    for v in variants:
        e = v.get("energy") or {}
        measured = (e.get("measured") or {}).get("mj_per_inference")
        rows.append({
            "name": _text(v.get("name")),
            "is_output": bool(v.get("is_output")),
            "estimate": _fmt(e.get("estimate_mj")),
            "gmacs": _fmt(e.get("macs"), "{:.2f}", 1e-9),
            "int8": _pct(e.get("int8_mac_fraction")),
            "bytes": _mb(e.get("bytes_moved")),
            "measured": _fmt(measured),
            "has_measured": _num(measured) is not None,
        })
    sources = sorted({str(_get(v, "energy", "source")) for v in variants
                      if _get(v, "energy", "source")})
    return {
        "rows": rows,
        "sources": sources,
        "any_measured": any(r["has_measured"] for r in rows),
    }


def _training(variants: list[dict[str, Any]], baseline: str | None, batch_sizes: list[int]) -> dict | None:
    """The teacher / student table and training curves, when a variant was distilled."""
    # Distillation records carry no kind (they predate the others).
    trained = [(v, t) for v in variants for t in (v.get("training") or []) if t.get("kind", "distill") == "distill"]
    if not trained:
        return None
    b1 = str(1 if 1 in batch_sizes else (batch_sizes[0] if batch_sizes else 1))
    teacher = next((v for v in variants if v.get("name") == baseline), None)
    rows = []
    if teacher is not None:
        params = _get(trained[0][1], "parameters", "teacher")
        rows.append({"name": _text(baseline), "role": "teacher", "params": _fmt(params, "{:,.0f}"),
                     "steps": DASH, "minutes": DASH, "before": DASH, "after": DASH,
                     "frozen": _pct(_get(teacher, "accuracy", "frozen_head")), "drop": DASH,
                     "latency": _ratio(_get(teacher, "latency", b1, "ratio_to_baseline")), "is_output": False})
    for v, t in trained:
        student = t.get("student") or {}
        source = f"layers {student['layers']}" if student.get("layers") else _text(student.get("model"))
        init = "from scratch" if student.get("init") == "random" else "from the teacher"
        if student.get("current"):
            source, init = "the compressed model", "recovering"
        rows.append({
            "name": _text(v.get("name")), "role": f"student: {source}, {init}",
            "params": _fmt(_get(t, "parameters", "student"), "{:,.0f}"),
            "steps": _fmt(t.get("steps"), "{:,.0f}"), "minutes": _fmt(t.get("seconds"), "{:.1f}", 1 / 60),
            "before": _fmt(_get(t, "before", "val_cosine"), "{:.4f}"),
            "after": _fmt(_get(t, "best", "value"), "{:.4f}"),
            "frozen": _pct(_get(v, "accuracy", "frozen_head")),
            "drop": _fmt(_get(v, "accuracy", "frozen_head_drop_pp"), "{:.2f} pp"),
            "latency": _ratio(_get(v, "latency", b1, "ratio_to_baseline")),
            "is_output": bool(v.get("is_output")),
        })
    plot = {
        "id": "plot-training",
        "src": _training_plot(trained),
        "alt": "Distillation loss per step, and validation cosine and held-out accuracy per evaluation, per distilled variant",
        "caption": "Distillation: the training loss (left), the mean cosine between student and teacher "
                   "embeddings on the held-out texts and, where the texts had labels, the accuracy of a frozen "
                   "head (fitted on the teacher's embeddings of training texts) on them, per distilled variant. "
                   "All of it from the train split.",
    }
    return {"rows": rows, "plot": plot, "batch": b1}


def _pruning(variants: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One sensitivity section per prune stage that chose its amounts from an analysis."""
    from slimkit.report.sensitivity import sensitivity_plot  # it draws with this module's helpers

    sections = []
    for v in variants:
        for record in v.get("pruning") or []:
            sens, choice = record.get("sensitivity"), record.get("choice") or {}
            if not isinstance(sens, dict):
                continue
            k = len(sections)
            groups = sens.get("groups") or {}
            kept = choice.get("kept") or {}
            rows = [{"group": _text(key), "size": _fmt(g.get("size"), "{:,.0f}"),
                     "kept": _fmt(kept.get(key, g.get("size")), "{:,.0f}"),
                     "pruned": key in kept} for key, g in groups.items() if isinstance(g, dict)]
            kind = choice.get("kind", "params")
            summary = (f"{_text(v.get('name'))}, stage {record.get('stage', DASH)}: each group pruned alone at "
                       f"{', '.join(f'{r:g}' for r in sens.get('ratios') or [])} of its size, scored by the "
                       f"{_text(record.get('metric') or 'task metric')}; then the groups that lose the least per "
                       f"{'parameter' if kind == 'params' else 'MAC'} removed were pruned until the model keeps "
                       f"{_fmt(choice.get('cost'), '{:,.0f}')} of {_fmt(choice.get('total'), '{:,.0f}')} "
                       f"{'parameters' if kind == 'params' else 'MACs'} (budget {_fmt(choice.get('budget'), '{:,.0f}')}).")
            sections.append({
                "variant": _text(v.get("name")), "summary": summary, "rows": rows,
                "table_id": f"pruning-table-{k}",
                "plot": {"id": f"plot-sensitivity-{k}", "src": sensitivity_plot(sens),
                         "alt": f"Sensitivity of {_text(v.get('name'))}: metric as each group is pruned alone",
                         "caption": "The metric as each group alone loses a rising fraction of its heads or "
                                    "neurons; the most sensitive groups are named."},
            })
    return sections


def _supervised(variants: list[dict[str, Any]]) -> dict | None:
    """The table and curves of the train stages (fine-tuning on labels, recovery after pruning)."""
    trained, rows, seen = [], [], set()
    for v in variants:
        for t in v.get("training") or []:
            if t.get("kind") != "train":
                continue
            # Variants that share their first stages share their training: show it once.
            key = (t.get("stage"), t.get("steps"), t.get("seconds"))
            first = key not in seen
            seen.add(key)
            if first:
                trained.append((v, t))
            rows.append({
                "name": _text(v.get("name")), "stage": _fmt(t.get("stage"), "{:.0f}"),
                "teacher": "labels + baseline's logits" if t.get("teacher") == "baseline" else "labels",
                "head": f"new, {t['head']['classes']} classes" if t.get("head") else "kept",
                "images": _fmt(t.get("train_images"), "{:,.0f}"), "val": _fmt(t.get("validation_images"), "{:,.0f}"),
                "steps": _fmt(t.get("steps"), "{:,.0f}"), "seen": _fmt(t.get("images_seen"), "{:,.0f}"),
                "minutes": _fmt(t.get("seconds"), "{:.1f}", 1 / 60),
                "before": _pct(_get(t, "before", "val_accuracy")), "after": _pct(_get(t, "best", "value")),
                "stopped": "yes" if t.get("stopped_early") else "no", "shared": not first,
                "is_output": bool(v.get("is_output")),
            })
    if not rows:
        return None
    plot = {
        "id": "plot-supervised",
        "src": _training_plot(trained, panels=[("val_accuracy", "Validation accuracy", "top-1 accuracy")]),
        "alt": "Training loss per step and validation accuracy per evaluation, per train stage",
        "caption": "Training on labels: the loss (left) and the top-1 accuracy on the train images held out "
                   "for validation, per train stage; the test split is not used.",
    }
    return {"rows": rows, "plot": plot}


def _training_plot(trained: list[tuple[dict, dict]], panels: list[tuple[str, str, str]] | None = None) -> str:
    if panels is None:
        panels = [("val_cosine", "Validation cosine to teacher", "mean cosine")]
        # The task panel appears where a stage could score the task (its texts had labels).
        if any(_num(e.get("val_accuracy")) is not None for _, t in trained for e in t.get("evals") or []):
            panels.append(("val_accuracy", "Held-out accuracy (frozen head)", "accuracy"))

    def draw(fig: Figure) -> None:
        loss_ax, *val_axes = fig.subplots(1, 1 + len(panels))
        for v, t in trained:
            color, label = (COLOR_OUTPUT if v.get("is_output") else None), _text(v.get("name"))
            hist = [h for h in t.get("history") or [] if _num(h.get("loss")) is not None]
            if hist:
                loss_ax.plot([h["step"] for h in hist], [h["loss"] for h in hist], lw=1, color=color, label=label)
            for ax, (key, _, _) in zip(val_axes, panels, strict=True):
                before = _num(_get(t, "before", key))
                points = ([(0, before)] if before is not None else []) + [
                    (e["step"], e[key]) for e in t.get("evals") or [] if _num(e.get(key)) is not None]
                if points:
                    ax.plot(*zip(*points, strict=True), "o-", ms=3, lw=1, color=color, label=label)
        for ax, (_, title, ylabel) in zip([loss_ax, *val_axes], [(None, "Training loss", "loss"), *panels], strict=True):
            if not ax.lines:
                _no_data(ax, title)
                continue
            ax.set_title(title)
            ax.set_xlabel("optimizer step")
            ax.set_ylabel(ylabel)
            ax.legend(fontsize=7, frameon=False)

    return _png(draw, (4.5 * (1 + len(panels)), 3.0))


# --- memory profile --------------------------------------------------------------------

# One colour per category, the same in every report: what exists before the step in
# greys and blues, what the step adds in warm colours.
MEMORY_COLORS = {
    "parameters": "#4c72b0", "buffers": "#8fa8cf", "inputs": "#b8b8b8", "other": "#d9d9d9",
    "optimizer_state": "#8172b2", "gradients": "#55a868", "activations": "#e07b00",
    "temporaries": "#f2c14e",
}
MEMORY_MODULE_ROWS = 15


def _bytes(value: Any) -> str:
    number = _num(value)
    return DASH if number is None else format_bytes(number)


def _module(value: Any) -> str:
    return module_label(value) if value is None or isinstance(value, str) else _text(value)


def _memory_profile(profile: Any) -> dict | None:
    """The memory-profile section (summary, timeline plot, module and tensor tables), when
    the metrics carry a profile as :meth:`slimkit.memory.MemoryProfile.to_dict` writes it."""
    if not isinstance(profile, dict):
        return None
    train = bool(profile.get("train"))
    peak = profile.get("peak") or {}
    modules = [m for m in profile.get("modules") or [] if isinstance(m, dict)]
    modules.sort(key=lambda m: (-(_num(m.get("live_at_peak_bytes")) or 0), -(_num(m.get("peak_live_bytes")) or 0)))
    rows = [{
        "module": _module(m.get("module")),
        "tensors": _fmt(m.get("tensors"), "{:,.0f}"),
        "allocated": _bytes(m.get("allocated_bytes")),
        "most_live": _bytes(m.get("peak_live_bytes")),
        "at_peak": _bytes(m.get("live_at_peak_bytes")),
        "backward": _bytes(m.get("backward_bytes")),
    } for m in modules[:MEMORY_MODULE_ROWS]]
    tensors = [{
        "bytes": _bytes(t.get("bytes")),
        "shape": "×".join(str(d) for d in t.get("shape") or []) or "scalar",
        "dtype": _text(t.get("dtype")),
        "category": _text(t.get("category")).replace("_", " "),
        "op": "(before the step)" if t.get("phase") == "start" else _text(t.get("op")),
        "where": _text(t.get("name")) if t.get("name") else _module(t.get("module")),
    } for t in profile.get("largest") or [] if isinstance(t, dict)]
    by_category = peak.get("by_category") or {}
    parts = [f"{c.replace('_', ' ')} {_bytes(v)}" for c, v in by_category.items() if _num(v)]
    what = "one training step (forward, loss, backward, optimizer step)" if train else \
        "one forward pass (eval mode, no grad)"
    model = f" of {profile['model']}" if profile.get("model") else ""
    where = "outside the model" if peak.get("module") is None else f"in {_module(peak.get('module'))}"
    summary = (f"Live tensor memory of {what}{model} on {_text(profile.get('device'))}. "
               f"Peak {_bytes(peak.get('bytes'))}, right after {_text(peak.get('op'))} {where} "
               f"({_text(peak.get('phase'))})" + (": " + ", ".join(parts) if parts else "") + ".")
    allocator = profile.get("allocator")
    if isinstance(allocator, dict):
        summary += (f" The CUDA allocator's own peak was {_bytes(allocator.get('peak_allocated_bytes'))} "
                    f"allocated and {_bytes(allocator.get('peak_reserved_bytes'))} reserved.")
    plot = {
        "id": "plot-memory-profile",
        "src": _memory_plot(profile),
        "alt": "Live tensor memory per operator, stacked by category, with the peak marked",
        "caption": "Live tensor memory after each operator, in the order they ran, stacked by "
                   "category: every live tensor (top) and only what the step made (bottom). "
                   "Shaded bands are the phases of the step; the dashed line is the peak.",
    }
    return {"summary": summary, "plot": plot, "rows": rows, "tensors": tensors, "train": train,
            "more_modules": max(len(modules) - MEMORY_MODULE_ROWS, 0)}


STEP_CATEGORIES = ("optimizer_state", "gradients", "activations", "temporaries")


def _memory_plot(profile: dict[str, Any]) -> str:
    """Two panels over the same operators: every live tensor, and only what the step made
    (which the parameters of a large model would otherwise flatten into a thin line)."""
    series = _get(profile, "timeline", "bytes")
    series = series if isinstance(series, dict) else {}
    cats = [c for c in CATEGORIES if isinstance(series.get(c), list) and any(_num(v) for v in series[c])]
    n = max((len(series[c]) for c in cats), default=0)
    ys = {c: [(_num(v) or 0.0) * 1e-6 for v in series[c]] + [0.0] * (n - len(series[c])) for c in cats}
    peak = profile.get("peak") or {}
    index = _num(peak.get("index"))
    what = "training step" if profile.get("train") else "forward pass"

    def panel(ax: Any, shown: list[str], title: str) -> None:
        if not shown or n == 0:
            _no_data(ax, title)
            return
        ax.stackplot(range(n), *(ys[c] for c in shown), labels=[c.replace("_", " ") for c in shown],
                     colors=[MEMORY_COLORS[c] for c in shown], step="post", lw=0)
        top = max(sum(col) for col in zip(*(ys[c] for c in shown), strict=True)) or 1.0
        runs = [r for r in profile.get("phases") or [] if isinstance(r, dict)
                and r.get("phase") not in ("start", "end")]
        for k, run in enumerate(runs):
            start, stop = _num(run.get("start")), _num(run.get("stop"))
            if start is None or stop is None:
                continue
            if k % 2 == 0:
                ax.axvspan(start, stop, color="#000", alpha=0.05, lw=0)
            if stop - start >= 0.07 * n:  # a label only where it fits
                ax.text((start + stop) / 2, top * 1.2, _text(run.get("phase")), ha="center", va="top",
                        fontsize=8, color="#555")
        if index is not None:
            ax.axvline(index, color="#b3261e", ls="--", lw=1)
        ax.set_xlim(0, max(n - 1, 1))
        ax.set_ylim(0, top * 1.25)
        ax.set_ylabel("MB")
        ax.set_title(title, loc="left")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)

    def draw(fig: Figure) -> None:
        all_ax, step_ax = fig.subplots(2, 1, sharex=True)
        label = f"peak {_bytes(peak.get('bytes'))} after {_text(peak.get('op'))}"
        panel(all_ax, cats, f"Every live tensor through the {what}: {label}")
        panel(step_ax, [c for c in cats if c in STEP_CATEGORIES], "Only what the step made")
        step_ax.set_xlabel("operator, in the order they ran")

    return _png(draw, (9.0, 5.2))


# --- plots -----------------------------------------------------------------------------


def _plots(variants: list[dict], baseline: str | None, batch_sizes: list[int]) -> list[dict]:
    """Every plot as ``{id, src, alt, caption}``, in the order the report shows them."""
    names = [_text(v.get("name")) for v in variants]
    colors = [_color(v, baseline) for v in variants]
    output = [bool(v.get("is_output")) for v in variants]
    ref = f"baseline {baseline}" if baseline else "the baseline"
    b1 = 1 if 1 in batch_sizes else (batch_sizes[0] if batch_sizes else 1)

    plots = [
        _tradeoff_plot(variants, baseline, b1),
        {
            "id": "plot-latency",
            "src": _latency_plot(variants, names, colors, output, batch_sizes),
            "alt": "Median latency per variant and batch size, with p10–p90 error bars",
            "caption": "Latency: median per call, error bars span p10–p90; one panel per "
                       f"batch size; labels give the ratio to {ref}. Shorter is faster.",
        },
        {
            "id": "plot-size",
            "src": _bar_plot(
                names, [_num(v.get("size_bytes")) for v in variants],
                [v.get("size_ratio") for v in variants], colors, output,
                "Size on disk", "MB", 1e-6,
            ),
            "alt": "Size on disk per variant",
            "caption": f"Size on disk (MB, 10⁶ bytes); labels give the ratio to {ref}.",
        },
        {
            "id": "plot-memory",
            "src": _bar_plot(
                names, [_num(v.get("peak_rss_bytes")) for v in variants],
                [v.get("rss_ratio") for v in variants], colors, output,
                "Peak resident memory", "MB", 1e-6,
            ),
            "alt": "Peak resident set size per variant",
            "caption": "Peak resident memory (RSS, MB) of the process serving each variant; "
                       f"labels give the ratio to {ref}.",
        },
        {
            "id": "plot-accuracy",
            "src": _accuracy_plot(variants, names, colors, output, baseline),
            "alt": f"{_accuracy_name(variants)} per variant",
            "caption": ("Top-1 accuracy of each variant's own classifier on the test split"
                        if _accuracy_name(variants).startswith("Top") else
                        "Frozen-head accuracy: the baseline's classifier head on each variant's embeddings")
                       + "; labels give the drop in percentage points. The axis is zoomed in to show small differences.",
        },
    ]
    assert tuple(p["id"] for p in plots) == PLOT_IDS
    return plots


def _color(v: dict[str, Any], baseline: str | None) -> str:
    if v.get("is_output"):
        return COLOR_OUTPUT
    if baseline is not None and v.get("name") == baseline:
        return COLOR_BASELINE
    return COLOR_OTHER


def _png(draw: Callable[[Figure], None], size: tuple[float, float]) -> str:
    """Draw a figure with ``draw`` and return it as a PNG data URI."""
    with rc_context(_RC):
        fig = Figure(figsize=size)
        FigureCanvasAgg(fig)  # explicit Agg canvas: no GUI backend, no pyplot state
        draw(fig)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=160, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _no_data(ax: Any, title: str) -> None:
    ax.set_title(title)
    ax.text(0.5, 0.5, "no data", ha="center", va="center", color="#888",
            transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _name_axis(ax: Any, names: list[str], output: list[bool]) -> None:
    ax.set_yticks(range(len(names)), names)
    for label, is_out in zip(ax.get_yticklabels(), output, strict=True):
        if is_out:
            label.set_fontweight("bold")
            label.set_color(COLOR_OUTPUT)
    ax.invert_yaxis()  # keep the table's order, top to bottom


def _bar_plot(
    names: list[str],
    values: Sequence[float | None],
    ratios: Sequence[Any],
    colors: list[str],
    output: list[bool],
    title: str,
    unit: str,
    scale: float,
) -> str:
    def draw(fig: Figure) -> None:
        ax = fig.add_subplot()
        if all(x is None for x in values):
            _no_data(ax, title)
            return
        scaled = [None if x is None else x * scale for x in values]
        top = max(x for x in scaled if x is not None)
        for i, x in enumerate(scaled):
            if x is None:
                ax.text(0, i, " not measured", va="center", color="#888")
                continue
            ax.barh(i, x, color=colors[i], height=0.65)
            ax.text(x + top * 0.02, i, f"{x:,.1f} {unit}  ({_ratio(ratios[i])})",
                    va="center")
        _name_axis(ax, names, output)
        ax.set_xlim(0, top * 1.45)
        ax.set_xlabel(unit)
        ax.set_title(title)

    return _png(draw, (5.2, 0.5 + 0.42 * max(len(names), 1)))


def _latency_plot(
    variants: list[dict],
    names: list[str],
    colors: list[str],
    output: list[bool],
    batch_sizes: list[int],
) -> str:
    def draw(fig: Figure) -> None:
        if not batch_sizes:
            _no_data(fig.add_subplot(), "Latency")
            return
        axes = fig.subplots(1, len(batch_sizes), squeeze=False)[0]
        for ax, b in zip(axes, batch_sizes, strict=True):
            title = f"Latency, batch {b}"
            stats = [_get(v, "latency", str(b)) or {} for v in variants]
            medians = [_num(s.get("median_ms")) for s in stats]
            if all(m is None for m in medians):
                _no_data(ax, title)
                continue
            ends = [_num(s.get("p90_ms")) or m for s, m in zip(stats, medians, strict=True)]
            top = max(e for e in ends if e is not None)
            for i, (s, m) in enumerate(zip(stats, medians, strict=True)):
                if m is None:
                    ax.text(0, i, " not measured", va="center", color="#888")
                    continue
                p10, p90 = _num(s.get("p10_ms")), _num(s.get("p90_ms"))
                err = None
                if p10 is not None and p90 is not None:
                    err = [[max(m - p10, 0.0)], [max(p90 - m, 0.0)]]
                ax.barh(i, m, xerr=err, color=colors[i], height=0.65,
                        error_kw={"ecolor": "#333", "capsize": 3, "lw": 1})
                label = f"{m:.1f} ms  ({_ratio(s.get('ratio_to_baseline'))})"
                ax.text((p90 or m) + top * 0.03, i, label, va="center")
            _name_axis(ax, names, output)
            ax.set_xlim(0, top * 1.55)
            ax.set_xlabel("ms per call")
            ax.set_title(title)
        fig.subplots_adjust(wspace=0.08)
        for ax in axes[1:]:
            ax.tick_params(labelleft=False)

    width = 5.2 if len(batch_sizes) <= 1 else 4.6 * len(batch_sizes)
    return _png(draw, (width, 0.5 + 0.42 * max(len(names), 1)))


def _accuracy_plot(
    variants: list[dict],
    names: list[str],
    colors: list[str],
    output: list[bool],
    baseline: str | None,
) -> str:
    def draw(fig: Figure) -> None:
        ax = fig.add_subplot()
        title = _accuracy_name(variants)
        accs = [_num(task_accuracy(v)[0]) for v in variants]
        present = [a * 100 for a in accs if a is not None]
        if not present:
            _no_data(ax, title)
            return
        lo, hi = min(present), max(present)
        pad = max((hi - lo) * 0.25, 0.5)
        left, right = lo - pad, hi + pad + max(hi - lo, 1.0) * 1.1
        for i, a in enumerate(accs):
            if a is None:
                ax.text(left, i, " not measured", va="center", color="#888")
                continue
            x = a * 100
            ax.hlines(i, left, x, color="#ddd", lw=1, zorder=1)
            ax.plot(x, i, "o", color=colors[i], ms=8, zorder=2)
            drop = _fmt(task_accuracy(variants[i])[1], "{:.2f} pp")
            ax.text(x + (right - left) * 0.03, i, f"{x:.1f}%  (drop {drop})", va="center",
                    bbox={"fc": "white", "ec": "none", "pad": 1})  # stay legible over the line
        base = next((a for v, a in zip(variants, accs, strict=True)
                     if v.get("name") == baseline and a is not None), None)
        if base is not None:
            ax.axvline(base * 100, color=COLOR_BASELINE, ls="--", lw=1)
        _name_axis(ax, names, output)
        ax.set_xlim(left, right)
        ax.set_xlabel("accuracy on the test split (%)")
        ax.set_title(title)

    return _png(draw, (5.2, 0.5 + 0.42 * max(len(names), 1)))


def _label_offsets(xy: list[tuple[float, float]]) -> list[tuple[int, int, str]]:
    """Label offsets (points) and alignment so that labels of close points do not overlap.

    Close means within 8% of the data range on both axes; the second of two close points
    gets its label below, a third to the left, and so on.
    """
    if not xy:
        return []
    xs, ys = [p[0] for p in xy], [p[1] for p in xy]
    wx = (max(xs) - min(xs)) or 1.0
    wy = (max(ys) - min(ys)) or 1.0
    choices = [(10, 6, "left"), (10, -26, "left"), (-10, 6, "right"), (-10, -26, "right")]
    placed: list[tuple[float, float, int]] = []
    out = []
    for x, y in xy:
        taken = {c for px, py, c in placed if abs(px - x) / wx < 0.08 and abs(py - y) / wy < 0.08}
        pick = next((i for i in range(len(choices)) if i not in taken), 0)
        placed.append((x, y, pick))
        out.append(choices[pick])
    return out


def _tradeoff_plot(variants: list[dict], baseline: str | None, batch: int) -> dict[str, str]:
    points, missing = [], []
    for v in variants:
        x = _num(_get(v, "latency", str(batch), "ratio_to_baseline"))
        y = _num(task_accuracy(v)[1])
        if x is None or y is None:
            missing.append(_text(v.get("name")))
        else:
            points.append((v, x, y, _num(v.get("size_bytes"))))

    def draw(fig: Figure) -> None:
        ax = fig.add_subplot()
        title = "Trade-off: speed-up vs accuracy lost (marker area ∝ size on disk)"
        if not points:
            _no_data(ax, title)
            return
        biggest = max((s for *_, s in points if s is not None), default=None)
        offsets = _label_offsets([(x, y) for _, x, y, _ in points])
        for (v, x, y, size), (dx, dy, ha) in zip(points, offsets, strict=True):
            area = 60.0 if size is None or not biggest else 40 + 560 * size / biggest
            is_base = baseline is not None and v.get("name") == baseline
            ax.scatter(x, y, s=area, color=_color(v, baseline), alpha=0.85,
                       marker="*" if is_base else "o", edgecolor="#333", lw=0.6, zorder=3)
            label = _text(v.get("name")) + (" (baseline)" if is_base else "")
            label += f"\n{_mb(size)}"
            ax.annotate(label, (x, y), xytext=(dx, dy), textcoords="offset points", ha=ha,
                        fontweight="bold" if v.get("is_output") else "normal",
                        color=COLOR_OUTPUT if v.get("is_output") else "#222")
        xs = [x for _, x, _, _ in points] + [1.0]
        ys = [y for _, _, y, _ in points] + [0.0]
        xpad = max((max(xs) - min(xs)) * 0.15, 0.05)
        ypad = max((max(ys) - min(ys)) * 0.2, 0.2)
        ax.set_xlim(min(xs) - xpad, max(xs) + xpad * 2.2)
        ax.set_ylim(min(ys) - ypad, max(ys) + ypad)
        ax.axvline(1.0, color=COLOR_BASELINE, ls="--", lw=1, zorder=1)
        ax.axhline(0.0, color=COLOR_BASELINE, ls="--", lw=1, zorder=1)
        ax.text(0.01, 0.02, "↙ better: faster and less accuracy lost", transform=ax.transAxes,
                color="#2a7a2a", fontsize=9)
        ax.set_xlabel(f"latency at batch {batch}, relative to baseline (×, lower is faster)")
        ax.set_ylabel(f"{_accuracy_name(variants).lower()} drop (pp, lower is better)")
        ax.set_title(title)
        ax.grid(alpha=0.3)

    caption = (f"Trade-off at batch {batch}: each point is a variant; further down-left is "
               "better. Marker area is proportional to size on disk; the baseline is the "
               "star at (1×, 0 pp).")
    if missing:
        caption += " Not plotted (missing latency or accuracy): " + ", ".join(missing) + "."
    return {
        "id": "plot-tradeoff",
        "src": _png(draw, (9.0, 4.6)),
        "alt": "Scatter of latency ratio against accuracy drop for every variant",
        "caption": caption,
    }
