"""Pruning minilm-l6 on rt-polarity: at least half of its attention heads and FFN neurons
removed, recovered by distillation, then int8.

1. shape: how much to remove. The (heads, FFN) fractions of SHAPE_CANDIDATES, from the
   least pruning up, are pruned (l1: the shape alone sets the speed) and timed at batch 1,
   sequence 128, in fp32 and as slimkit-int8 against the unpruned fp32 model; the least
   pruning whose ratios stay a margin under the targets (0.6x fp32, 0.2x int8) is kept.
   --heads/--ffn skip this.
2. pilot: which heads and neurons. Each importance (l1 per layer; taylor and michel per
   layer and global, scored on train texts) prunes the model, which then recovers for a
   few steps; the best cosine to the unpruned model on 500 held-out train texts wins.
3. recover: the chosen pruned model learns back towards the unpruned one (cosine of the
   sentence embeddings and of every layer's hidden states, as the distill_minilm student
   does) on the other train texts, labels unused, early stopping on the held-out cosine.
4. One measured run, on the full test split: the unpruned fp32 model (baseline), ONNX
   Runtime dynamic int8 of it, the pruned model before recovery, after recovery, and after
   recovery as slimkit-int8 (the foundation's best int8, benchmarks/bert_int8.py). The
   frozen head is fit on the fp32 model's train embeddings.

Every phase keeps its results under --work: an interrupted run continues where it stopped.

    python benchmarks/prune_minilm.py                  # -> benchmarks/results/prune_minilm.json
    python benchmarks/prune_minilm.py --phase shape    # only choose how much to remove
    python benchmarks/prune_minilm.py --phase train    # shape, pilot and recovery, no measurement
    python benchmarks/prune_minilm.py --quick --out /tmp/q.json --work /tmp/q
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import target, work_folder, write_result  # noqa: E402
from bert_int8 import OUTPUT as BEST_INT8  # noqa: E402
from bert_int8 import RECIPE as BERT_INT8  # noqa: E402

from slimkit import serialize  # noqa: E402
from slimkit.atomic import write_json  # noqa: E402
from slimkit.distill import EarlyStopping, LossTerm  # noqa: E402
from slimkit.distill.stage import DistillStageConfig, run_distill_stage  # noqa: E402
from slimkit.measure.latency import paired_ratio  # noqa: E402
from slimkit.prune import TransformerPruneConfig, prune_  # noqa: E402
from slimkit.prune.heads import encoder_layers  # noqa: E402
from slimkit.quantize.api import record_transform  # noqa: E402
from slimkit.recipe import Recipe  # noqa: E402
from slimkit.runner import run  # noqa: E402
from slimkit.zoo.models import LoadedModel, load_model  # noqa: E402
from slimkit.zoo.tasks import load_task  # noqa: E402

# The int8 paths, exactly as benchmarks/bert_int8.py measures them.
SLIMKIT_INT8 = BERT_INT8["stages"]
ORT_INT8 = next(v["stages"] for v in BERT_INT8["compare"] if v["name"] == "ort-dynamic-int8")

TARGETS = {"fp32": 0.6, "int8": 0.2}
# The shape is chosen from a short timing; the measured run must still meet the targets.
MARGINS = {"fp32": 0.04, "int8": 0.02}
# (heads, ffn) fractions removed, from the least pruning: MiniLM's 12 heads per layer
# down to 6, 5 or 4, and its 1,536 FFN neurons down to 384 or 288. With half the heads
# and 461 neurons per layer, int8 timed at 0.20-0.21x: no margin under the 0.2x target.
SHAPE_CANDIDATES = [(0.5, 0.75), (7 / 12, 0.75), (8 / 12, 0.75), (8 / 12, 0.8125)]
IMPORTANCES = [("l1", "per_layer"), ("taylor", "per_layer"), ("michel", "per_layer"),
               ("taylor", "global"), ("michel", "global")]
VAL_TEXTS = 500  # the last train texts: the pilot and early stopping use them, never the test split
CALIBRATION = {"batches": 32, "batch_size": 32}  # train texts that taylor and michel score on
# The pruned model starts much further from the teacher than distill_minilm's student
# (val cosine ~0.65 against ~0.80), hence twice its learning rate, with clipping.
RECOVER = {"lr": 2e-4, "schedule": "cosine", "warmup_steps": 50, "epochs": 3, "batch_size": 32,
           "eval_every": 100, "checkpoint_every": 100, "max_grad_norm": 1.0, "seed": 0}
PATIENCE = 3  # evaluations (every eval_every steps) without a better val cosine
PILOT = {"max_steps": 60, "warmup_steps": 10, "eval_every": 0}
MEASURE = {"batch_sizes": [1], "seq_len": 128, "rounds": 25, "iters": 5, "warmup": 5, "energy": False}
SHAPE_MEASURE = {"batch_sizes": [1], "seq_len": 128, "rounds": 10, "iters": 5, "warmup": 3,
                 "accuracy": False, "memory": False, "energy": False}
QUICK = {"texts": 96, "val": 32, "calibration": {"batches": 2, "batch_size": 16}, "pilot_steps": 2,
         "shape_candidates": [(0.5, 0.5), (0.5, 0.75)], "train_limit": 100, "test_limit": 60,
         # Peak memory is not a target here: the quick run skips its five child processes.
         "measure": {"rounds": 1, "iters": 1, "warmup": 1, "memory": False}}


def shape_name(heads: float, ffn: float) -> str:
    return f"h{heads:g}-f{ffn:g}"


def choose_shape(work: Path, candidates: list[tuple[float, float]], threads: int, quick: bool) -> dict:
    """Time pruned shapes against the unpruned model; keep the least pruning that fits."""
    path = work / "shape.json"
    if path.exists():
        return json.loads(path.read_text())
    prune = lambda h, f: {"prune": {"method": "transformer_structured", "heads": h, "ffn": f}}  # noqa: E731
    names = [shape_name(h, f) for h, f in candidates]
    variants = [(f"{n}-fp32", [prune(*c)]) for n, c in zip(names, candidates, strict=True)]
    variants += [(f"{n}-int8", [prune(*c), *SLIMKIT_INT8]) for n, c in zip(names, candidates, strict=True)]
    recipe = {
        "name": "prune-minilm-shape", "model": "minilm-l6", "variant": variants[0][0], "stages": variants[0][1],
        "compare": [{"name": n, "stages": s} for n, s in variants[1:]],
        # Only timing: the test texts give the fixed-length input, nothing is scored on them.
        "task": {"source": "rt-polarity", "train_limit": 64, "test_limit": 64},
        "measure": {**SHAPE_MEASURE, "threads": threads, **(QUICK["measure"] if quick else {})},
    }
    with tempfile.TemporaryDirectory(prefix="slimkit-bench-") as tmp:
        folder = run(Recipe.from_dict(recipe), Path(tmp) / "run", progress=sys.stderr.isatty())
        metrics = json.loads((folder / "metrics.json").read_text())
    ratio = {x["name"]: x["latency"]["1"]["ratio_to_baseline"] for x in metrics["variants"]}
    table = []
    for n, (h, f) in zip(names, candidates, strict=True):
        row = {"heads": h, "ffn": f, "fp32_ratio": ratio[f"{n}-fp32"], "int8_ratio": ratio[f"{n}-int8"]}
        row["fits"] = all(row[f"{k}_ratio"] <= TARGETS[k] - MARGINS[k] for k in TARGETS)
        table.append(row)
    chosen = next((r for r in table if r["fits"]), table[-1])
    doc = {"candidates": table, "targets": TARGETS, "margins": MARGINS, "threads": threads,
           "heads": chosen["heads"], "ffn": chosen["ffn"],
           "chosen_by": "least pruning within the margins" if chosen["fits"] else "none fit: the most pruning timed"}
    write_json(path, doc)
    return doc


def calibration_batches(tokenizer, texts: list[str], batches: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(batches):
        enc = tokenizer(texts[i * batch_size:(i + 1) * batch_size], truncation=True, max_length=128,
                        padding="longest", return_tensors="pt")
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                    "token_type_ids": torch.zeros_like(enc["input_ids"])})
    return out


def structure(model: LoadedModel) -> dict:
    layers = encoder_layers(model.module)
    return {"heads_per_layer": [x.num_heads for x in layers], "ffn_per_layer": [x.width for x in layers],
            "parameters": sum(p.numel() for p in model.module.parameters())}


def recovery_config(n_val: int, n_layers: int, **overrides) -> DistillStageConfig:
    """The distill stage with ``student: {current: true}``: the pruned model learns back
    towards the unpruned one. It keeps every layer and the width, so each layer's hidden
    states are compared with the same layer's, with no projection."""
    hidden = {f"backbone.encoder.layer.{i}": f"backbone.encoder.layer.{i}" for i in range(n_layers)}
    fields = {**RECOVER, **overrides}
    return DistillStageConfig(
        student={"current": True}, validation_texts=n_val,
        losses=[LossTerm(kind="output_cosine"), LossTerm(kind="hidden_cosine", layers=hidden)],
        early_stopping=EarlyStopping(metric="val_cosine", patience=PATIENCE), **fields)


def phase(folder: Path, fn) -> dict:
    """Run ``fn(folder)`` once; its record makes later calls return at once.

    ``fn`` trains with resumable checkpoints in ``folder/checkpoint``; once the record
    is written they are not needed again (each holds the model and its optimizer state).
    """
    if (folder / "record.json").exists():
        return json.loads((folder / "record.json").read_text())
    record = fn(folder)
    write_json(folder / "record.json", record)
    shutil.rmtree(folder / "checkpoint", ignore_errors=True)
    return record


def summary(record: dict) -> dict:
    """A distill stage's record without its loss curve."""
    keep = ("train_texts", "validation_texts", "steps", "seconds", "stopped_early", "before", "best", "evals")
    out = {k: record[k] for k in keep}
    out["seconds_per_step"] = record["seconds"] / max(record["steps"], 1)
    history = record.get("history") or [{}]
    out["loss_first"], out["loss_last"] = history[0].get("loss"), history[-1].get("loss")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny subsets, a few steps: checks the script runs")
    p.add_argument("--phase", choices=["shape", "pilot", "train", "all"], default="all",
                   help="stop after this phase (all: measure too)")
    p.add_argument("--out", type=Path, help="result file (default benchmarks/results/prune_minilm.json; --quick needs it)")
    p.add_argument("--work", type=Path, help="where phases keep their results (default .bench-work/prune_minilm)")
    p.add_argument("--heads", type=float, help="fraction of heads to remove, instead of the shape phase's choice")
    p.add_argument("--ffn", type=float, help="fraction of FFN neurons to remove, instead of the shape phase's choice")
    p.add_argument("--threads", type=int, default=2, help="for training and measurement")
    args = p.parse_args()
    if args.quick and args.out is None:
        p.error("--quick results are not benchmark results: give --out PATH")
    if (args.heads is None) != (args.ffn is None):
        p.error("give both --heads and --ffn, or neither (the shape phase then chooses)")
    work = work_folder("prune_minilm", args.quick, args.work)
    torch.set_num_threads(args.threads)

    # 1. shape
    if args.heads is not None:
        shape = {"heads": args.heads, "ffn": args.ffn, "chosen_by": "command line"}
    else:
        shape = choose_shape(work, QUICK["shape_candidates"] if args.quick else SHAPE_CANDIDATES, args.threads, args.quick)
    print(json.dumps(shape, indent=1), file=sys.stderr)
    if args.phase == "shape":
        return 0

    teacher = load_model("minilm-l6")
    task = load_task("rt-polarity")
    texts, val_texts = task.train_texts[:-VAL_TEXTS], task.train_texts[-VAL_TEXTS:]
    calibration, pilot_steps = dict(CALIBRATION), PILOT["max_steps"]
    if args.quick:
        texts, val_texts = texts[: QUICK["texts"]], val_texts[: QUICK["val"]]
        calibration, pilot_steps = dict(QUICK["calibration"]), QUICK["pilot_steps"]
    # run_distill_stage holds out the last len(val_texts) texts, as distill_minilm does.
    stage_texts = texts + val_texts
    calib = calibration_batches(teacher.tokenizer, texts, calibration["batches"], calibration["batch_size"])
    n_layers = len(encoder_layers(teacher.module))
    quick_steps = {"warmup_steps": 1, "eval_every": 0, "checkpoint_every": 2} if args.quick else {}

    # 2. pilot
    def pilot_fn(importance: str, scope: str):
        def fn(folder: Path) -> dict:
            model = teacher.clone()
            cfg = TransformerPruneConfig(heads=shape["heads"], ffn=shape["ffn"], importance=importance, scope=scope,
                                         calibration_batches=calibration["batches"])
            prune_(model.module, cfg, calibration=calib)
            serialize.save(model, folder / "pruned")
            stage = recovery_config(len(val_texts), n_layers, **{**PILOT, **quick_steps, "max_steps": pilot_steps})
            _, rec = run_distill_stage(model, stage, stage_texts, folder / "checkpoint", progress=sys.stderr.isatty(),
                                       original=teacher)
            return {"importance": importance, "scope": scope, **structure(model), **summary(rec),
                    "val_cosine_before": rec["before"]["val_cosine"], "val_cosine_after": rec["best"]["value"]}
        return fn

    pilots = {}
    for importance, scope in IMPORTANCES:
        name = f"{shape_name(shape['heads'], shape['ffn'])}-{importance}-{scope}"
        pilots[name] = phase(work / "pilot" / name, pilot_fn(importance, scope))
    chosen = max(pilots, key=lambda n: pilots[n]["val_cosine_after"])
    print(json.dumps({n: (r["val_cosine_before"], r["val_cosine_after"]) for n, r in pilots.items()}, indent=1),
          file=sys.stderr)
    if args.phase == "pilot":
        return 0

    # 3. recover
    pruned_dir = work / "pilot" / chosen / "pruned"

    def recover_fn(folder: Path) -> dict:
        model = serialize.load(pruned_dir)
        stage = recovery_config(len(val_texts), n_layers, **quick_steps)
        model, rec = run_distill_stage(model, stage, stage_texts, folder / "checkpoint", progress=sys.stderr.isatty(),
                                       original=teacher)
        record_transform(model.module, stage, [])
        serialize.save(model, folder / "model")
        return {"pruned": chosen, "config": stage.to_dict(), **summary(rec)}

    recovery = phase(work / f"recovered-{chosen}", recover_fn)
    recovered_dir = work / f"recovered-{chosen}" / "model"
    if args.phase == "train":
        print(json.dumps({"shape": shape, "pilot": chosen, "recovery": recovery}, indent=1))
        return 0

    # 4. measure
    quick_task = {"train_limit": QUICK["train_limit"], "test_limit": QUICK["test_limit"]} if args.quick else {}
    recipe = {
        "name": "prune-minilm", "model": "minilm-l6", "variant": "ort-dynamic-int8", "stages": ORT_INT8,
        "task": {"source": "rt-polarity", **quick_task},
        "compare": [
            {"name": "pruned-fp32", "model": str(pruned_dir)},
            {"name": "pruned-recovered-fp32", "model": str(recovered_dir)},
            {"name": "pruned-recovered-int8", "model": str(recovered_dir), "stages": SLIMKIT_INT8},
        ],
        "measure": {**MEASURE, "threads": args.threads, **(QUICK["measure"] if args.quick else {})},
    }
    with tempfile.TemporaryDirectory(prefix="slimkit-bench-") as tmp:
        folder = run(Recipe.from_dict(recipe), Path(tmp) / "run", progress=sys.stderr.isatty())
        metrics = json.loads((folder / "metrics.json").read_text())

    unpruned, pruned = structure(teacher), structure(serialize.load(recovered_dir))
    heads_removed = 1 - sum(pruned["heads_per_layer"]) / sum(unpruned["heads_per_layer"])
    ffn_removed = 1 - sum(pruned["ffn_per_layer"]) / sum(unpruned["ffn_per_layer"])
    v = {x["name"]: x for x in metrics["variants"]}
    drop = lambda n: v[n]["accuracy"]["frozen_head_drop_pp"]  # noqa: E731
    lat = lambda n: v[n]["latency"]["1"]  # noqa: E731
    targets = [
        target("heads_removed_fraction", heads_removed, ">=", 0.5),
        target("ffn_removed_fraction", ffn_removed, ">=", 0.5),
        target("pruned_recovered_accuracy_drop", drop("pruned-recovered-fp32"), "<=", 1.5, "pp"),
        target("pruned_recovered_latency_b1_vs_fp32", lat("pruned-recovered-fp32")["ratio_to_baseline"], "<=", 0.6, "x"),
        target("pruned_recovered_int8_latency_b1_vs_fp32", lat("pruned-recovered-int8")["ratio_to_baseline"], "<=", 0.2, "x"),
        target("pruned_recovered_int8_accuracy_drop", drop("pruned-recovered-int8"), "<=", 2.0, "pp"),
    ]
    params = {n: (unpruned if n in ("fp32", "ort-dynamic-int8") else pruned)["parameters"] for n in v}
    table = {
        "columns": ["variant", "parameters", "cosine to fp32 (test)", "frozen-head accuracy %", "drop pp",
                    "latency b1 ms", "vs fp32", "vs ort-dynamic-int8"],
        "rows": [[n, params[n], x["accuracy"]["cosine_mean"], 100 * x["accuracy"]["frozen_head"],
                  x["accuracy"]["frozen_head_drop_pp"], lat(n)["median_ms"], lat(n)["ratio_to_baseline"],
                  paired_ratio(lat(n), lat("ort-dynamic-int8"))] for n, x in v.items()],
    }
    body = {
        "quick": args.quick, "task": metrics["task"], "table": table,
        "shape": shape,
        "pruning": {"heads": shape["heads"], "ffn": shape["ffn"], "chosen": chosen,
                    "importance": pilots[chosen]["importance"], "scope": pilots[chosen]["scope"],
                    "heads_kept_per_layer": pruned["heads_per_layer"], "ffn_kept_per_layer": pruned["ffn_per_layer"],
                    "heads_total": sum(unpruned["heads_per_layer"]), "ffn_total": sum(unpruned["ffn_per_layer"]),
                    "parameters": {"unpruned": unpruned["parameters"], "pruned": pruned["parameters"]}},
        "pilot": {"steps": pilot_steps, "calibration": calibration,
                  "candidates": {n: {k: r[k] for k in ("importance", "scope", "heads_per_layer", "ffn_per_layer",
                                                       "val_cosine_before", "val_cosine_after", "seconds")}
                                 for n, r in pilots.items()}},
        "recovery": recovery,
        "best_int8_of_foundation": BEST_INT8,
        "pruned_int8_latency_vs_ort_dynamic_int8": paired_ratio(lat("pruned-recovered-int8"), lat("ort-dynamic-int8")),
        "variants": [{k: x[k] for k in ("name", "framework", "size_bytes", "size_ratio", "peak_rss_bytes",
                                        "rss_ratio", "accuracy")}
                     | {"parameters": params[x["name"]],
                        "latency_b1": {k: lat(x["name"])[k] for k in ("median_ms", "p10_ms", "p90_ms", "ratio_to_baseline")}}
                     for x in metrics["variants"]],
    }
    path = write_result("prune_minilm", args.threads, "cpu", body, targets, args.out)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
