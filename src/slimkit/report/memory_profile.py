"""The memory-profile section: summary, live-memory timeline plot, module and tensor tables."""

from __future__ import annotations

from typing import Any

from matplotlib.figure import Figure

from slimkit.memory.timeline import CATEGORIES, format_bytes, module_label
from slimkit.report.figures import _no_data, _png
from slimkit.report.formatting import DASH, _fmt, _get, _num, _text

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
