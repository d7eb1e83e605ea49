"""Reading and formatting metric values: any field may be null, and a missing value is shown as a dash.

Also the one place that knows which accuracy a variant reports (top-1 for an image
classifier, the frozen head's for a text encoder).
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

DASH = "—"


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


def task_accuracy(v: dict[str, Any]) -> tuple[Any, Any]:
    """A variant's task accuracy and its drop from the baseline in points: top-1 for an
    image classifier, the frozen head's for a text encoder."""
    acc = v.get("accuracy") or {}
    if "top1" in acc:
        return acc.get("top1"), acc.get("top1_drop_pp")
    return acc.get("frozen_head"), acc.get("frozen_head_drop_pp")


def _accuracy_name(variants: list[dict[str, Any]]) -> str:
    return "Top-1 accuracy" if any("top1" in (v.get("accuracy") or {}) for v in variants) else "Frozen-head accuracy"
