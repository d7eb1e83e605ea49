"""Distilling minilm-l6, and quantization-aware training of it, measured on rt-polarity.

1. A 3-layer student initialised from teacher layers 1, 3 and 5 learns the teacher's
   sentence embeddings and hidden states on the rt-polarity train texts (labels unused).
2. Quantization-aware training of the full minilm-l6 (fake-quantized as ONNX Runtime's
   dynamic int8 computes), with the fp32 model as teacher, then int8 for ONNX Runtime.
3. One measured run against the fp32 teacher, with the foundation's best int8 of the
   teacher (slimkit-int8) beside them, on the full test split; the frozen head is fit on
   the teacher's train embeddings.

Training phases keep their checkpoints and results under --work: an interrupted run
continues where it stopped.

    python benchmarks/distill_minilm.py                 # -> benchmarks/results/distill_minilm.json
    python benchmarks/distill_minilm.py --phase train   # only the training phases
    python benchmarks/distill_minilm.py --quick --out /tmp/q.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import target, work_folder, write_result  # noqa: E402

from slimkit import serialize  # noqa: E402
from slimkit.atomic import write_json  # noqa: E402
from slimkit.distill import DistillConfig, EarlyStopping, LossTerm, distill  # noqa: E402
from slimkit.distill.students import shallow_transformer  # noqa: E402
from slimkit.distill.text import text_data  # noqa: E402
from slimkit.measure.latency import paired_ratio  # noqa: E402
from slimkit.measure.runners import make_runner  # noqa: E402
from slimkit.measure.task import TokenizedTexts, cosine_rows, embed  # noqa: E402
from slimkit.quantize import QATConfig, convert_qat_, quantize_  # noqa: E402
from slimkit.recipe import Recipe  # noqa: E402
from slimkit.runner import run  # noqa: E402
from slimkit.zoo.models import load_model  # noqa: E402
from slimkit.zoo.tasks import load_task  # noqa: E402

STUDENT_LAYERS = [1, 3, 5]
VAL_TEXTS = 500  # the last train texts: early stopping on them, never on the test split
STUDENT = {"lr": 1e-4, "schedule": "cosine", "warmup_steps": 50, "epochs": 3, "batch_size": 32,
           "checkpoint_every": 50, "seed": 0}
QAT = {"lr": 1e-5, "schedule": "cosine", "epochs": 1, "batch_size": 32, "checkpoint_every": 50, "seed": 0}
QUICK = {"texts": 96, "val": 32, "epochs": 1, "test_limit": 100, "train_limit": 200}


def val_cosine(teacher_emb, val):
    def evaluate(student):
        emb = embed(make_runner_like(student), val)
        return {"val_cosine": float(cosine_rows(emb, teacher_emb).mean())}
    return evaluate


def make_runner_like(module):
    def run_module(ids, mask, tt):
        with torch.inference_mode():
            return module(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(tt)).float().numpy()
    return run_module


def train_phase(name, work: Path, fn):
    """Run ``fn`` once; its saved model and record make later calls return at once."""
    folder = work / name
    if (folder / "record.json").exists():
        return json.loads((folder / "record.json").read_text())
    model, record = fn(folder)
    serialize.save(model, folder / "model")
    write_json(folder / "record.json", record)
    return record


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--phase", choices=["train", "all"], default="all")
    p.add_argument("--out", type=Path)
    p.add_argument("--work", type=Path)
    p.add_argument("--train-threads", type=int, default=2, help="threads for the training phases (measurement uses 2)")
    args = p.parse_args()
    if args.quick and args.out is None:
        p.error("--quick results are not benchmark results: give --out PATH")
    work = work_folder("distill_minilm", args.quick, args.work)
    torch.set_num_threads(args.train_threads)

    teacher = load_model("minilm-l6")
    task = load_task("rt-polarity")
    texts = task.train_texts[: -VAL_TEXTS]
    val_texts = task.train_texts[-VAL_TEXTS:]
    student_cfg, qat_cfg = dict(STUDENT), dict(QAT)
    if args.quick:
        texts, val_texts = texts[: QUICK["texts"]], val_texts[: QUICK["val"]]
        student_cfg.update(epochs=QUICK["epochs"], checkpoint_every=2, warmup_steps=1)
        qat_cfg.update(checkpoint_every=2)
    data = text_data(teacher.tokenizer, texts, max_len=128)
    val = TokenizedTexts(teacher.tokenizer, val_texts, 128)
    teacher_val = embed(make_runner(teacher, 2), val)

    def student_fn(folder):
        student = shallow_transformer(teacher, STUDENT_LAYERS)
        hidden = {f"backbone.encoder.layer.{i}": f"backbone.encoder.layer.{t}" for i, t in enumerate(STUDENT_LAYERS)}
        cfg = DistillConfig(
            losses=[LossTerm(kind="output_cosine"), LossTerm(kind="hidden_cosine", layers=hidden)],
            early_stopping=EarlyStopping(metric="val_cosine", patience=2), **student_cfg)
        result = distill(teacher.module, student.module, data, cfg, evaluate=val_cosine(teacher_val, val),
                         checkpoint_dir=folder / "checkpoint", device="cpu", progress=sys.stderr.isatty())
        return student, {"layers": STUDENT_LAYERS, "steps": result.steps, "best": result.best,
                         "train_seconds": result.seconds,
                         "evals": result.evals, "loss_first": result.history[0]["loss"] if result.history else None,
                         "loss_last": result.history[-1]["loss"] if result.history else None}

    def qat_fn(folder):
        model = teacher.clone()
        quantize_(model.module, QATConfig(target="onnxruntime"))
        cfg = DistillConfig(losses=[LossTerm(kind="output_cosine")], **qat_cfg)
        result = distill(teacher.module, model.module, data, cfg, evaluate=val_cosine(teacher_val, val),
                         checkpoint_dir=folder / "checkpoint", device="cpu", progress=sys.stderr.isatty())
        convert_qat_(model.module, "onnxruntime")
        return model, {"steps": result.steps, "evals": result.evals, "train_seconds": result.seconds}

    s_rec = train_phase("student", work, student_fn)
    q_rec = train_phase("qat", work, qat_fn)
    torch.set_num_threads(2)
    if args.phase == "train":
        print(json.dumps({"student": s_rec, "qat": q_rec}, indent=1))
        return 0

    int8 = [{"export": {"optimize": "auto"}}, {"quantize": {"method": "ort_dynamic_int8"}}]
    recipe = {
        "name": "distill-minilm", "model": "minilm-l6", "variant": "slimkit-int8", "stages": int8,
        "task": {"source": "rt-polarity"} if not args.quick else
                {"source": "rt-polarity", "train_limit": QUICK["train_limit"], "test_limit": QUICK["test_limit"]},
        "compare": [
            {"name": "student-fp32", "model": str(work / "student" / "model")},
            {"name": "student-int8", "model": str(work / "student" / "model"), "stages": int8},
            {"name": "qat-int8", "model": str(work / "qat" / "model"), "stages": int8},
        ],
        "measure": {"batch_sizes": [1], "seq_len": 128, "threads": 2,
                    "rounds": 25 if not args.quick else 1, "iters": 5 if not args.quick else 1, "warmup": 5,
                    # Peak memory is not a target here: the quick run skips its child processes.
                    "energy": False, "memory": not args.quick},
    }
    with tempfile.TemporaryDirectory(prefix="slimkit-bench-") as tmp:
        folder = run(Recipe.from_dict(recipe), Path(tmp) / "run", progress=sys.stderr.isatty())
        metrics = json.loads((folder / "metrics.json").read_text())
    v = {x["name"]: x for x in metrics["variants"]}
    drop = lambda n: v[n]["accuracy"]["frozen_head_drop_pp"]  # noqa: E731
    lat = lambda n: v[n]["latency"]["1"]  # noqa: E731
    targets = [
        target("student_accuracy_drop", drop("student-fp32"), "<=", 2.0, "pp"),
        target("student_latency_b1_vs_teacher", lat("student-fp32")["ratio_to_baseline"], "<=", 0.55, "x"),
        target("student_int8_latency_b1_vs_teacher", lat("student-int8")["ratio_to_baseline"], "<=", 0.2, "x"),
        target("student_int8_accuracy_drop", drop("student-int8"), "<=", 3.0, "pp"),
        target("qat_int8_accuracy_drop", drop("qat-int8"), "<=", 0.6, "pp"),
        target("qat_int8_latency_vs_best_int8", paired_ratio(lat("qat-int8"), lat("slimkit-int8")), "<=", 1.1, "x"),
        target("student_distillation_minutes", s_rec["train_seconds"] / 60.0, "<=", 30.0, "min"),
    ]
    body = {"quick": args.quick, "task": metrics["task"], "student": s_rec, "qat": q_rec,
            "variants": [{k: x[k] for k in ("name", "framework", "size_bytes", "size_ratio", "peak_rss_bytes",
                                            "rss_ratio", "accuracy")}
                         | {"latency_b1": {k: x["latency"]["1"][k] for k in ("median_ms", "p10_ms", "p90_ms", "ratio_to_baseline")}}
                         for x in metrics["variants"]]}
    path = write_result("distill_minilm", 2, "cpu", body, targets, args.out)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
