"""The energy section: the analytical estimate per variant and any measured energy."""

from __future__ import annotations

from typing import Any

from slimkit.report.formatting import _fmt, _get, _mb, _num, _pct, _text


def _energy(variants: list[dict[str, Any]]) -> dict[str, Any]:
    # The device profiles a run estimated on (measure.devices), in the order first seen.
    devices: list[str] = []
    for v in variants:
        for d in (v.get("energy") or {}).get("devices") or []:
            if d.get("device") not in devices:
                devices.append(d.get("device"))
    rows = []
    for v in variants:
        e = v.get("energy") or {}
        measured = (e.get("measured") or {}).get("mj_per_inference")
        on = {d.get("device"): d for d in e.get("devices") or []}
        rows.append({
            "name": _text(v.get("name")),
            "is_output": bool(v.get("is_output")),
            "estimate": _fmt(e.get("estimate_mj")),
            "gmacs": _fmt(e.get("macs"), "{:.2f}", 1e-9),
            "int8": _pct(e.get("int8_mac_fraction")),
            "bytes": _mb(e.get("bytes_moved")),
            "measured": _fmt(measured),
            "has_measured": _num(measured) is not None,
            "devices": [{"ms": _fmt((on.get(name) or {}).get("latency_ms")),
                         "mj": _fmt((on.get(name) or {}).get("energy_mj")),
                         "bound": _text((on.get(name) or {}).get("bound") or "")} for name in devices],
        })
    sources = sorted({str(_get(v, "energy", "source")) for v in variants
                      if _get(v, "energy", "source")})
    return {
        "rows": rows,
        "sources": sources,
        "any_measured": any(r["has_measured"] for r in rows),
        "devices": [_text(d) for d in devices],
    }
