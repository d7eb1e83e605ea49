"""The report's main plots: trade-off scatter, latency, size, memory and accuracy per variant."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from matplotlib.figure import Figure

from slimkit.report.figures import COLOR_BASELINE, COLOR_OUTPUT, _color, _name_axis, _no_data, _png
from slimkit.report.formatting import (
    _accuracy_name,
    _fmt,
    _get,
    _mb,
    _num,
    _ratio,
    _text,
    task_accuracy,
)

PLOT_IDS = ("plot-tradeoff", "plot-latency", "plot-size", "plot-memory", "plot-accuracy")


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
