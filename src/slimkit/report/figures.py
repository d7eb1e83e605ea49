"""The plotting basics every report figure shares: colours, the matplotlib style, a
figure drawn to a PNG data URI, the "no data" panel and the variant-name axis."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from typing import Any

from matplotlib import rc_context
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# The output variant is the one colour that stands out; the rest stay quiet.
COLOR_OUTPUT = "#e07b00"
COLOR_BASELINE = "#8c8c8c"
COLOR_OTHER = "#6b8fb5"

_RC = {
    "font.size": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.titlesize": 10,
    "axes.titleweight": "bold",
}


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


def _color(v: dict[str, Any], baseline: str | None) -> str:
    if v.get("is_output"):
        return COLOR_OUTPUT
    if baseline is not None and v.get("name") == baseline:
        return COLOR_BASELINE
    return COLOR_OTHER
