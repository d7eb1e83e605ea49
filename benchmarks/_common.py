"""What every benchmark result file carries: machine, versions, commit, command, targets."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from slimkit.atomic import write_json
from slimkit.runner import machine_info

RESULTS = Path(__file__).resolve().parent / "results"
WORK = Path(__file__).resolve().parents[1] / ".bench-work"


def work_folder(name: str, quick: bool, given: Path | None) -> Path:
    """Where a benchmark keeps what it trained, for resuming: ``given``, else
    ``.bench-work/NAME`` (``NAME_quick`` for quick runs, so they never mix)."""
    return given or WORK / (f"{name}_quick" if quick else name)


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).parent).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else None
    except OSError:
        return None


def target(name: str, value: float | None, op: str, threshold: float, unit: str = "") -> dict:
    ops = {"<=": lambda a, b: a <= b, "<": lambda a, b: a < b, ">=": lambda a, b: a >= b, ">": lambda a, b: a > b,
           "==": lambda a, b: a == b}
    met = value is not None and ops[op](value, threshold)
    return {"name": name, "value": value, "op": op, "threshold": threshold, "unit": unit, "met": met}


def write_result(name: str, threads: int, device: str, body: dict, targets: list[dict], out: Path | None) -> Path:
    """Write ``benchmarks/results/NAME.json`` (or ``out``) atomically, and print it."""
    info = machine_info(threads, device)
    doc = {"benchmark": name, "command": " ".join([Path(sys.executable).name, *sys.argv]),
           "git_commit": git_commit(), "machine": info["machine"], "threads": threads,
           "versions": info["versions"], **body, "targets": targets}
    path = out or RESULTS / f"{name}.json"
    write_json(path, doc)
    return path
