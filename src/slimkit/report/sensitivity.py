"""The sensitivity plot: the task metric as each channel group alone is pruned harder."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from matplotlib.figure import Figure

from slimkit.report.figures import COLOR_BASELINE, COLOR_OTHER, _no_data, _png

# Enough colours to tell the most sensitive groups apart; the rest are drawn quietly.
_HIGHLIGHT = ("#e07b00", "#c0392b", "#7d3c98", "#1f77b4", "#2e8b57", "#8c564b")


def sensitivity_plot(sensitivity: Mapping[str, Any], highlight: int = 6) -> str:
    """Plot :func:`slimkit.prune.sensitivity.channel_sensitivity`'s result as a PNG data URI.

    One line per group: the metric against the fraction of its channels removed, starting
    from the whole model's metric at 0 (also drawn as a dashed line). The ``highlight``
    groups that lose the most on average over the ratios are coloured and named in the
    legend; the others are thin grey-blue lines, so that a 50-group network stays
    readable.

    Args:
        sensitivity: the dict ``channel_sensitivity`` returned.
        highlight: how many of the most sensitive groups to colour and name.

    Returns:
        ``data:image/png;base64,...``, for an ``<img src>``.
    """
    groups = sensitivity.get("groups") or {}
    ratios = list(sensitivity.get("ratios") or [])
    baseline = sensitivity.get("baseline")
    sign = 1.0 if sensitivity.get("higher_is_better", True) else -1.0

    def loss(item: tuple[str, Mapping[str, Any]]) -> float:
        metric = item[1]["metric"]
        return sign * (baseline - sum(metric) / len(metric)) if metric and baseline is not None else 0.0

    def curve(g: Mapping[str, Any]) -> tuple[list[float], list[float]]:
        if baseline is None:
            return ratios, list(g["metric"])
        return [0.0, *ratios], [baseline, *g["metric"]]

    ranked = sorted(groups.items(), key=loss, reverse=True)
    shown = {key for key, _ in ranked[: max(highlight, 0)]}

    def draw(fig: Figure) -> None:
        ax = fig.add_subplot()
        title = "Sensitivity: metric as one channel group is pruned"
        if not groups or not ratios:
            _no_data(ax, title)
            return
        for key, g in groups.items():
            if key not in shown:
                ax.plot(*curve(g), color=COLOR_OTHER, alpha=0.45, linewidth=0.8)
        for i, (key, g) in enumerate(k for k in ranked if k[0] in shown):
            ax.plot(*curve(g), color=_HIGHLIGHT[i % len(_HIGHLIGHT)], linewidth=1.6, marker="o",
                    markersize=3, label=f"{key} ({g['size']} ch)")
        if baseline is not None:
            ax.axhline(baseline, color=COLOR_BASELINE, linestyle="--", linewidth=1, label="unpruned")
        ax.set_title(title)
        ax.set_xlabel("fraction of the group's channels removed")
        ax.set_ylabel("metric" + ("" if sign > 0 else " (lower is better)"))
        ax.set_xlim(0, 1)
        ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))

    return _png(draw, (6.0, 3.6))
