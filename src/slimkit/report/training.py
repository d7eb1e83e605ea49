"""The training sections: distillation (teacher / student table and curves, ``_training``)
and supervised train stages (``_supervised``), which share the training-curve plot."""

from __future__ import annotations

from typing import Any

from matplotlib.figure import Figure

from slimkit.report.figures import COLOR_OUTPUT, _no_data, _png
from slimkit.report.formatting import DASH, _fmt, _get, _num, _pct, _ratio, _text


def _training(variants: list[dict[str, Any]], baseline: str | None, batch_sizes: list[int]) -> dict | None:
    """The teacher / student table and training curves, when a variant was distilled."""
    # Records in metrics files written before records had a kind are distillation.
    trained = [(v, t) for v in variants for t in (v.get("training") or []) if t.get("kind", "distill") == "distill"]
    if not trained:
        return None
    b1 = str(1 if 1 in batch_sizes else (batch_sizes[0] if batch_sizes else 1))
    teacher = next((v for v in variants if v.get("name") == baseline), None)
    rows = []
    if teacher is not None:
        params = _get(trained[0][1], "parameters", "teacher")
        rows.append({"name": _text(baseline), "role": "teacher", "params": _fmt(params, "{:,.0f}"),
                     "steps": DASH, "minutes": DASH, "before": DASH, "after": DASH,
                     "frozen": _pct(_get(teacher, "accuracy", "frozen_head")), "drop": DASH,
                     "latency": _ratio(_get(teacher, "latency", b1, "ratio_to_baseline")), "is_output": False})
    for v, t in trained:
        student = t.get("student") or {}
        source = f"layers {student['layers']}" if student.get("layers") else _text(student.get("model"))
        init = "from scratch" if student.get("init") == "random" else "from the teacher"
        if student.get("current"):
            source, init = "the compressed model", "recovering"
        rows.append({
            "name": _text(v.get("name")), "role": f"student: {source}, {init}",
            "params": _fmt(_get(t, "parameters", "student"), "{:,.0f}"),
            "steps": _fmt(t.get("steps"), "{:,.0f}"), "minutes": _fmt(t.get("seconds"), "{:.1f}", 1 / 60),
            "before": _fmt(_get(t, "before", "val_cosine"), "{:.4f}"),
            "after": _fmt(_get(t, "best", "value"), "{:.4f}"),
            "frozen": _pct(_get(v, "accuracy", "frozen_head")),
            "drop": _fmt(_get(v, "accuracy", "frozen_head_drop_pp"), "{:.2f} pp"),
            "latency": _ratio(_get(v, "latency", b1, "ratio_to_baseline")),
            "is_output": bool(v.get("is_output")),
        })
    plot = {
        "id": "plot-training",
        "src": _training_plot(trained),
        "alt": "Distillation loss per step, and validation cosine and held-out accuracy per evaluation, per distilled variant",
        "caption": "Distillation: the training loss (left), the mean cosine between student and teacher "
                   "embeddings on the held-out texts and, where the texts had labels, the accuracy of a frozen "
                   "head (fitted on the teacher's embeddings of training texts) on them, per distilled variant. "
                   "All of it from the train split.",
    }
    return {"rows": rows, "plot": plot, "batch": b1}


def _supervised(variants: list[dict[str, Any]]) -> dict | None:
    """The table and curves of the train stages (fine-tuning on labels, recovery after pruning)."""
    trained, rows, seen = [], [], set()
    for v in variants:
        for t in v.get("training") or []:
            if t.get("kind") != "train":
                continue
            # Variants that share their first stages share their training: show it once.
            key = (t.get("stage"), t.get("steps"), t.get("seconds"))
            first = key not in seen
            seen.add(key)
            if first:
                trained.append((v, t))
            rows.append({
                "name": _text(v.get("name")), "stage": _fmt(t.get("stage"), "{:.0f}"),
                "teacher": "labels + baseline's logits" if t.get("teacher") == "baseline" else "labels",
                "head": f"new, {t['head']['classes']} classes" if t.get("head") else "kept",
                "images": _fmt(t.get("train_images"), "{:,.0f}"), "val": _fmt(t.get("validation_images"), "{:,.0f}"),
                "steps": _fmt(t.get("steps"), "{:,.0f}"), "seen": _fmt(t.get("images_seen"), "{:,.0f}"),
                "minutes": _fmt(t.get("seconds"), "{:.1f}", 1 / 60),
                "before": _pct(_get(t, "before", "val_accuracy")), "after": _pct(_get(t, "best", "value")),
                "stopped": "yes" if t.get("stopped_early") else "no", "shared": not first,
                "is_output": bool(v.get("is_output")),
            })
    if not rows:
        return None
    plot = {
        "id": "plot-supervised",
        "src": _training_plot(trained, panels=[("val_accuracy", "Validation accuracy", "top-1 accuracy")]),
        "alt": "Training loss per step and validation accuracy per evaluation, per train stage",
        "caption": "Training on labels: the loss (left) and the top-1 accuracy on the train images held out "
                   "for validation, per train stage; the test split is not used.",
    }
    return {"rows": rows, "plot": plot}


def _training_plot(trained: list[tuple[dict, dict]], panels: list[tuple[str, str, str]] | None = None) -> str:
    if panels is None:
        panels = [("val_cosine", "Validation cosine to teacher", "mean cosine")]
        # The task panel appears where a stage could score the task (its texts had labels).
        if any(_num(e.get("val_accuracy")) is not None for _, t in trained for e in t.get("evals") or []):
            panels.append(("val_accuracy", "Held-out accuracy (frozen head)", "accuracy"))

    def draw(fig: Figure) -> None:
        loss_ax, *val_axes = fig.subplots(1, 1 + len(panels))
        for v, t in trained:
            color, label = (COLOR_OUTPUT if v.get("is_output") else None), _text(v.get("name"))
            hist = [h for h in t.get("history") or [] if _num(h.get("loss")) is not None]
            if hist:
                loss_ax.plot([h["step"] for h in hist], [h["loss"] for h in hist], lw=1, color=color, label=label)
            for ax, (key, _, _) in zip(val_axes, panels, strict=True):
                before = _num(_get(t, "before", key))
                points = ([(0, before)] if before is not None else []) + [
                    (e["step"], e[key]) for e in t.get("evals") or [] if _num(e.get(key)) is not None]
                if points:
                    ax.plot(*zip(*points, strict=True), "o-", ms=3, lw=1, color=color, label=label)
        for ax, (_, title, ylabel) in zip([loss_ax, *val_axes], [(None, "Training loss", "loss"), *panels], strict=True):
            if not ax.lines:
                _no_data(ax, title)
                continue
            ax.set_title(title)
            ax.set_xlabel("optimizer step")
            ax.set_ylabel(ylabel)
            ax.legend(fontsize=7, frameon=False)

    return _png(draw, (4.5 * (1 + len(panels)), 3.0))
