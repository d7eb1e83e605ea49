"""The backends section: ``slimkit bench`` rows (backends x threads x batch sizes) as a
table and a latency-against-threads plot per batch size."""

from __future__ import annotations

from typing import Any

from matplotlib.figure import Figure

from slimkit.report.figures import _no_data, _png
from slimkit.report.formatting import _fmt, _num, _ratio, _text

PLOT_ID = "plot-backends"


def _backends(bench: dict[str, Any] | None) -> dict[str, Any] | None:
    if not bench or not bench.get("rows"):
        return None
    rows = bench["rows"]
    table = [{"variant": _text(r.get("variant")), "backend": _text(r.get("backend")), "threads": r.get("threads"),
              "batch": r.get("batch"), "median": _fmt(r.get("median_ms"), "{:.2f}"),
              "spread": f"{_fmt(r.get('p10_ms'), '{:.2f}')} to {_fmt(r.get('p90_ms'), '{:.2f}')}",
              "throughput": _fmt(r.get("throughput_per_s")), "ratio": _ratio(r.get("ratio_to_reference"))}
             for r in rows]
    batches = sorted({r["batch"] for r in rows})
    return {
        "rows": table,
        "reference": _text(bench.get("reference")),
        "harness": f"{bench.get('rounds')} rounds of {bench.get('iters')} calls after {bench.get('warmup')} warm-up",
        "plot": {"id": PLOT_ID, "src": _plot(rows, batches),
                 "alt": "median latency against thread count, one line per variant and backend, one panel per batch size",
                 "caption": "Median latency per call against intra-op threads; lower is faster."},
    }


def _plot(rows: list[dict[str, Any]], batches: list[int]) -> str:
    def draw(fig: Figure) -> None:
        axes = fig.subplots(1, max(len(batches), 1), squeeze=False)[0]
        for ax, b in zip(axes, batches, strict=False):
            lines: dict[str, list[tuple[int, float]]] = {}
            for r in rows:
                m = _num(r.get("median_ms"))
                if r["batch"] == b and m is not None:
                    lines.setdefault(f"{r['variant']} / {r['backend']}", []).append((r["threads"], m))
            if not lines:
                _no_data(ax, f"Batch {b}")
                continue
            for label, points in lines.items():
                points.sort()
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
            ax.set_xticks(sorted({r["threads"] for r in rows}))
            ax.set_xlabel("threads")
            ax.set_ylabel("ms per call")
            ax.set_ylim(bottom=0)
            ax.set_title(f"Batch {b}")
        axes[0].legend(fontsize=7, frameon=False)

    # One panel would stretch over the page's width: keep it wide and short.
    return _png(draw, (7.5, 2.6) if len(batches) <= 1 else (4.2 * len(batches), 2.8))
