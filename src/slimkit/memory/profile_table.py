"""A memory profile as rich tables on the terminal (what ``slimkit profile`` prints)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from slimkit.memory.timeline import CATEGORIES, MemoryProfile, format_bytes, module_label


def print_profile(profile: MemoryProfile, console: Console | None = None, title: str | None = None,
                  modules: int = 15) -> None:
    """Print the peak, the live bytes by category, the largest tensors and the modules.

    Args:
        profile: what :func:`slimkit.memory.profile` returned.
        console: where to print; a new :class:`rich.console.Console` by default.
        title: a heading, such as the recipe's name.
        modules: how many modules to list (those with the most activation memory live at
            the peak, then the most live at any time).
    """
    console = console or Console()
    what = "training step (forward, loss, backward, optimizer step)" if profile.train \
        else "forward pass (eval mode, no grad)"
    console.print(f"[bold]{title + ': ' if title else ''}memory of one {what} on {profile.device}[/bold]")
    peak = profile.peak
    console.print(
        f"Peak {format_bytes(peak.bytes)} of live tensors, right after [bold]{peak.op}[/bold] "
        f"{_where(peak.module, bold=True)} ({peak.phase}, operator {peak.index} of "
        f"{len(profile.timeline) - 2})"
    )
    if profile.allocator:
        a = profile.allocator
        console.print(
            f"CUDA allocator: peak allocated {format_bytes(a.get('peak_allocated_bytes'))} "
            f"({format_bytes(a.get('peak_above_start_bytes'))} above the start), peak reserved "
            f"{format_bytes(a.get('peak_reserved_bytes'))}"
            + (f"; snapshot written to {a['snapshot']}" if a.get("snapshot") else "")
        )

    used = [c for c in CATEGORIES if any(d.get(c) for d in (profile.start, peak.by_category, profile.end))]
    table = Table(title="Live bytes by category")
    table.add_column("category")
    for col in ("start", "peak", "end"):
        table.add_column(col, justify="right")
    for c in used:
        table.add_row(c.replace("_", " "), *(format_bytes(d.get(c, 0)) for d in (profile.start, peak.by_category, profile.end)))
    table.add_row("[bold]total[/bold]", *(f"[bold]{format_bytes(sum(d.values()))}[/bold]"
                                          for d in (profile.start, peak.by_category, profile.end)))
    console.print(table)

    phases = [r for r in profile.phases() if r["phase"] not in ("start", "end")]
    if len(phases) > 1:
        table = Table(title="Peak of each phase")
        for col, justify in (("phase", "left"), ("operators", "right"), ("peak", "right"), ("at", "left")):
            table.add_column(col, justify=justify)
        for r in phases:
            e = profile.timeline[r["peak_index"]]
            table.add_row(r["phase"], str(r["stop"] - r["start"]), format_bytes(r["peak_bytes"]),
                          f"{e.op} {_where(e.module)}")
        console.print(table)

    table = Table(title="Largest tensors live at the peak")
    for col, justify in (("bytes", "right"), ("shape", "left"), ("dtype", "left"), ("category", "left"),
                         ("made by", "left"), ("module or name", "left")):
        table.add_column(col, justify=justify)
    for t in peak.tensors:
        table.add_row(format_bytes(t.bytes), "×".join(map(str, t.shape)) or "scalar", t.dtype,
                      t.category.replace("_", " "), t.op if t.phase != "start" else "(before the step)",
                      t.name or module_label(t.module))
    console.print(table)

    rows = sorted(profile.modules, key=lambda m: (-m.live_at_peak_bytes, -m.peak_live_bytes))[:modules]
    rows = [m for m in rows if m.allocated_bytes or m.backward_bytes]
    if rows:
        table = Table(title="Activation memory by module (each module's own operators)")
        table.add_column("module")
        for col in ("tensors", "allocated", "most live", "live at peak") + (("backward",) if profile.train else ()):
            table.add_column(col, justify="right")
        for m in rows:
            cells = [str(m.tensors), format_bytes(m.allocated_bytes), format_bytes(m.peak_live_bytes),
                     format_bytes(m.live_at_peak_bytes)]
            if profile.train:
                cells.append(format_bytes(m.backward_bytes))
            table.add_row(module_label(m.module), *cells)
        console.print(table)


def _where(module: str | None, bold: bool = False) -> str:
    if module is None:
        return "outside the model"
    label = module_label(module)
    return f"in [bold]{label}[/bold]" if bold else f"in {label}"
