"""The self-contained HTML report of a run."""

from slimkit.report.html import render_report

__all__ = ["render_report"]
