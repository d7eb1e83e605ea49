"""The report's tables of facts: the harness and task rows, the variants summary table,
the headline sentence and the targets table."""

from __future__ import annotations

from typing import Any

from slimkit.report.formatting import DASH, _fmt, _get, _num, _pct, _ratio, _text, task_accuracy

_OPS = {"<=": "≤", ">=": "≥", "<": "<", ">": ">", "==": "="}


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
