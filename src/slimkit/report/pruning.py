"""The pruning-sensitivity sections: one per prune stage that chose its amounts from an analysis."""

from __future__ import annotations

from typing import Any

from slimkit.report.formatting import DASH, _fmt, _text
from slimkit.report.sensitivity import sensitivity_plot


def _pruning(variants: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One sensitivity section per prune stage that chose its amounts from an analysis."""
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
