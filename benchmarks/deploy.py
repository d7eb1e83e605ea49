"""Edge deployment: every variant exports to ONNX, matches PyTorch, and runs under ONNX Runtime;
static int8 against fp32 and dynamic int8; the serving process's memory.

Two models, each run as a recipe with ``slimkit run`` (one process, interleaved rounds,
paired ratios; accuracy on the full fixed test split; calibration on the train split):

- MobileNetV2 on Fashion-MNIST at 128x128, the shipped recipe
  ``recipes/mobilenetv2-fashion.yaml`` (ImageNet weights fine-tuned, channels pruned to
  at most 0.6x the MACs, recovered with the fine-tuned model as teacher), measured as: the
  fine-tuned model in PyTorch (baseline), under ONNX Runtime in fp32 and in static int8
  (QDQ), and the pruned model in PyTorch, under ONNX Runtime in fp32 and in static int8
  (the combined variant).
- minilm-l6 on rt-polarity: PyTorch fp32 (baseline), ONNX Runtime fp32, ONNX Runtime's
  dynamic int8 with its defaults, slimkit's dynamic int8 (fused attention, per-channel),
  and static int8 (fused attention as QAttention, smoothing, calibrated on train
  sentences). Then the pruned and distilled MiniLM of ``benchmarks/prune_minilm.py``
  (its kept work folder) in fp32 and in static int8 (the combined variant). The serving
  process of each ONNX variant (ONNX Runtime alone, no torch) answers 20 requests at
  batch 1, sequence 128, and its peak RSS is read.

PyTorch-native static int8 (``pt2e_static_int8``: torchao's PT2E flow, compiled by
Inductor) is run as two more recipes, beside PyTorch fp32 and ONNX Runtime in the same
run: the fine-tuned and the pruned MobileNetV2 of the vision run, and minilm-l6. Then
``slimkit bench`` measures those runs' PyTorch variants eager and through
``torch.compile``, so PT2E is also compared with compiled fp32. It is not a target of the
issue; the result keeps it under ``pytorch_int8``.

Then every variant's PyTorch model (fp32 and pruned, of both) goes through
``slimkit export`` at fp32, fp16, int8-dynamic and int8-static: ONNX Runtime's outputs
must match PyTorch's (fp32: max abs diff <= 1e-4 and cosine >= 0.99999; fp16: cosine
>= 0.9999); int8's agreement is reported.

    python benchmarks/deploy.py            # -> benchmarks/results/deploy.json (MobileNetV2's run takes about an hour)
    python benchmarks/deploy.py --quick --out /tmp/q.json   # a smoke run of the same code (CI)

Run folders are kept under --work: an interrupted run resumes its training from the
checkpoints beside its folder, and a finished run is read instead of run again. The
quick run uses a slice of the data, a few steps, and minilm-l6 pruned without recovery
in place of prune_minilm's model.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import WORK, git_commit, target, work_folder, write_result  # noqa: E402

from slimkit.measure.latency import paired_ratio  # noqa: E402

NAME = "deploy"
ROOT = Path(__file__).resolve().parents[1]
VISION_RECIPE = ROOT / "recipes" / "mobilenetv2-fashion.yaml"
DEVICES = ["jetson-orin-nx-16gb", "raspberry-pi-5", "x86-server-core"]
MEASURE = {"batch_sizes": [1], "seq_len": 128, "threads": 2, "rounds": 25, "iters": 20, "warmup": 5, "devices": DEVICES}
STATIC = {"method": "ort_static_int8", "calibration_samples": 256}
PRECISIONS = ["fp32", "fp16", "int8-dynamic", "int8-static"]
SERVING_LIMIT_MB = 150


def vision_recipe() -> dict:
    """The shipped MobileNetV2 recipe with the variants this benchmark compares."""
    raw = yaml.safe_load(VISION_RECIPE.read_text())
    prune, recover = raw["stages"][0], raw["stages"][1]
    raw["name"] = "deploy-mobilenetv2"
    raw["stages"] = [prune, recover, {"export": {}}, {"quantize": dict(STATIC)}]
    raw["variant"] = "pruned-ort-int8-static"
    raw["compare"] = [
        {"name": "ort-fp32", "stages": [{"export": {}}]},
        {"name": "ort-int8-static", "stages": [{"export": {}}, {"quantize": dict(STATIC)}]},
        {"name": "pruned-fp32", "stages": [prune, recover]},
        {"name": "pruned-ort-fp32", "stages": [prune, recover, {"export": {}}]},
    ]
    raw["measure"] = {**raw["measure"], **{k: v for k, v in MEASURE.items() if k != "seq_len"}}
    return raw


VISION_QUICK = [
    "task.train_limit=600", "task.test_limit=200", "task.image_size=64",
    "prepare.0.train.max_steps=4", "prepare.0.train.validation=64", "prepare.0.train.eval_every=2",
    "stages.0.prune.budget.images=32", "stages.0.prune.budget.ratios=[0.5]", "stages.0.prune.importance=l1",
    "stages.1.train.max_steps=2", "stages.1.train.validation=64", "stages.1.train.eval_every=2",
    "stages.3.quantize.calibration_samples=16", "compare.1.stages.1.quantize.calibration_samples=16",
    "measure.rounds=2", "measure.iters=3", "measure.warmup=1",
    "measure.memory=false",  # a fresh serving process per variant; the memory target is MiniLM's
]


def text_recipe(model: str, name: str, pruned: Path, quick: bool = False) -> dict:
    """minilm-l6: fp32, ONNX Runtime fp32, dynamic and static int8; the pruned model in fp32 and static int8
    (quick: the variants the targets read, and the pruned model in static int8)."""
    fused = {"export": {"optimize": "auto"}}
    compare = [
        {"name": "ort-fp32", "stages": [fused]},
        {"name": "ort-int8-dynamic-defaults", "stages": [
            {"export": {"optimize": "none"}}, {"quantize": {"method": "ort_dynamic_int8", "per_channel": False}}]},
        {"name": "ort-int8-dynamic", "stages": [fused, {"quantize": {"method": "ort_dynamic_int8"}}]},
        {"name": "pruned-ort-fp32", "model": str(pruned), "stages": [fused]},
        {"name": "pruned-ort-int8-static", "model": str(pruned), "stages": [fused, {"quantize": dict(STATIC)}]},
    ]
    if quick:
        compare = [c for c in compare if c["name"] not in ("ort-int8-dynamic-defaults", "pruned-ort-fp32")]
    return {
        "version": 1, "name": name, "model": model, "task": {"source": "rt-polarity"},
        "variant": "ort-int8-static", "stages": [fused, {"quantize": dict(STATIC)}],
        "compare": compare,
        "measure": dict(MEASURE),
    }


PT2E = {"method": "pt2e_static_int8", "calibration_samples": 256}


def pytorch_int8_recipe(vision: dict, fine_tuned: Path, pruned: Path, quick: bool = False) -> dict:
    """PyTorch-native static int8 (PT2E, compiled by Inductor) of the fine-tuned and the
    pruned MobileNetV2 from the vision run, beside PyTorch fp32 and ONNX Runtime in the same
    run; the same task, so accuracy is on the same full test split (quick: PT2E against
    fp32 only, each compile being tens of seconds)."""
    compare = [
        {"name": "ort-fp32", "stages": [{"export": {}}]},
        {"name": "ort-int8-static", "stages": [{"export": {}}, {"quantize": dict(STATIC)}]},
        {"name": "pruned-fp32", "model": str(pruned), "stages": []},
        {"name": "pruned-pt2e-int8", "model": str(pruned), "stages": [{"quantize": dict(PT2E)}]},
    ]
    return {
        "version": 1, "name": "deploy-pt2e-mobilenetv2", "model": str(fine_tuned), "task": vision["task"],
        "variant": "pt2e-int8", "stages": [{"quantize": dict(PT2E)}], "compare": [] if quick else compare,
        "measure": {**vision["measure"], "memory": False},
    }


def pytorch_int8_text_recipe(model: str, quick: bool = False) -> dict:
    """minilm-l6 in PT2E static int8 beside PyTorch fp32 and ONNX Runtime's static int8."""
    compare = [{"name": "ort-int8-static", "stages": [{"export": {"optimize": "auto"}}, {"quantize": dict(STATIC)}]}]
    return {
        "version": 1, "name": "deploy-pt2e-minilm", "model": model, "task": {"source": "rt-polarity"},
        "variant": "pt2e-int8", "stages": [{"quantize": dict(PT2E)}], "compare": [] if quick else compare,
        "measure": {**MEASURE, "memory": False},
    }


# Quick runs leave PT2E uncompiled (reference operators): each compile costs tens of
# seconds in CI, and the compiled path has its own tests.
PT2E_QUICK = ["task.train_limit=600", "task.test_limit=200", "task.image_size=64", "stages.0.quantize.calibration_samples=16",
              "stages.0.quantize.compile=false", "measure.rounds=2", "measure.iters=3", "measure.warmup=1"]
PT2E_TEXT_QUICK = ["task.train_limit=200", "task.test_limit=100", "stages.0.quantize.calibration_samples=16",
                   "stages.0.quantize.compile=false", "measure.rounds=1", "measure.iters=2", "measure.warmup=1"]

TEXT_QUICK = ["task.train_limit=200", "task.test_limit=100", "measure.rounds=1", "measure.iters=2",
              "measure.warmup=1", "stages.1.quantize.calibration_samples=16",
              "compare.2.stages.1.quantize.calibration_samples=16"]


def run_recipe(recipe: dict, folder: Path, overrides: list[str]) -> tuple[dict, float | None]:
    """``slimkit run`` ``recipe`` into ``folder`` (or read the finished run there); its metrics and wall time.

    The commit the run was made with is kept beside it (``<folder>.commit``): a finished
    run read by a later commit says which code measured it.
    """
    if (folder / "metrics.json").is_file():
        return json.loads((folder / "metrics.json").read_text()), None
    folder.parent.mkdir(parents=True, exist_ok=True)
    recipe_file = folder.parent / f"{folder.name}.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe, sort_keys=False))
    cmd = [sys.executable, "-m", "slimkit.cli", "run", str(recipe_file), *overrides, "-o", str(folder)]
    if not sys.stderr.isatty():
        cmd.append("--no-progress")
    started = time.time()
    folder.with_name(f"{folder.name}.commit").write_text(f"{git_commit()}\n")
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        print(f"{NAME}: `slimkit run` failed for {folder.name} (exit {proc.returncode})", file=sys.stderr)
        sys.exit(proc.returncode)
    return json.loads((folder / "metrics.json").read_text()), time.time() - started


def export_checks(sources: dict[str, Path], recipe_file: Path, precisions: list[str], work: Path) -> list[dict]:
    """``slimkit export`` of each PyTorch model at each precision, checked against PyTorch."""
    from slimkit.exporting import ExportMismatch, export_model

    rows = []
    for name, source in sources.items():
        for precision in precisions:
            out = work / "exports" / f"{name}-{precision}"
            started = time.time()
            try:
                found = export_model(str(source), precision, out, recipe=str(recipe_file), calibration_samples=128)
                row = {"model": name, "precision": precision, "exported": True, "matched": True,
                       "max_abs_diff": found["max_abs_diff"], "cosine": found["cosine"], "reference": found["reference"]}
            except ExportMismatch as e:
                row = {"model": name, "precision": precision, "exported": True, "matched": False, "error": str(e)}
            row["seconds"] = time.time() - started
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    return rows


def variant_summary(metrics: dict, wall: float | None) -> dict:
    """What the result file keeps of a run: every variant's accuracy, latency, size, memory, energy."""
    keep_acc = ("top1", "top1_drop_pp", "cosine_mean", "cosine_min", "frozen_head", "frozen_head_drop_pp")
    return {
        "recipe": metrics["recipe"], "wall_seconds": wall, "task": metrics["task"],
        "harness": {k: metrics["harness"][k] for k in ("threads", "batch_sizes", "seq_len", "rounds", "iters", "warmup",
                                                       "device") if k in metrics["harness"]},
        "variants": [
            {"name": v["name"], "framework": v["framework"], "stages": [s["kind"] + ":" + s["method"] for s in v["stages"]],
             "accuracy": {k: a for k, a in (v.get("accuracy") or {}).items() if k in keep_acc},
             "size_bytes": v["size_bytes"], "peak_rss_bytes": v.get("peak_rss_bytes"),
             "torch_imported": v.get("torch_imported"),
             "latency": {b: {k: s[k] for k in ("median_ms", "p10_ms", "p90_ms", "ratio_to_baseline")}
                         for b, s in v["latency"].items()},
             "energy": {k: (v.get("energy") or {}).get(k) for k in ("macs", "estimate_mj", "measured_mj", "devices")}}
            for v in metrics["variants"]
        ],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a slice of the data and a few steps: checks the script runs")
    p.add_argument("--out", type=Path, help="result file (default benchmarks/results/deploy.json; --quick needs it)")
    p.add_argument("--work", type=Path, help="where the run folders are kept (default .bench-work/deploy)")
    p.add_argument("--pruned-minilm", type=Path,
                   help="the pruned, distilled MiniLM (default: the model kept by benchmarks/prune_minilm.py)")
    p.add_argument("--only", choices=["mobilenetv2"], help="run only this model's recipe (to start the long run)")
    args = p.parse_args()
    if args.quick and args.out is None:
        p.error("--quick results are not benchmark results: give --out PATH")
    work = work_folder(NAME, args.quick, args.work)
    vision = vision_recipe()
    mnv2, mnv2_wall = run_recipe(vision, work / "mobilenetv2", VISION_QUICK if args.quick else [])
    if args.only:
        return 0

    pruned_minilm = args.pruned_minilm or (quick_pruned_minilm(work) if args.quick else kept_pruned_minilm())
    text = text_recipe("minilm-l6", "deploy-minilm", pruned_minilm, args.quick)
    minilm, minilm_wall = run_recipe(text, work / "minilm", TEXT_QUICK if args.quick else [])

    precisions = ["fp32", "int8-static"] if args.quick else PRECISIONS
    run_v = work / "mobilenetv2" / "variants"
    checks = export_checks({"mobilenetv2": run_v / "fp32", "mobilenetv2-pruned": run_v / "pruned-fp32"},
                           work / "mobilenetv2.yaml", precisions, work)
    checks += export_checks({"minilm-l6": work / "minilm" / "variants" / "fp32", "minilm-l6-pruned": pruned_minilm},
                            work / "minilm.yaml", precisions if not args.quick else ["fp32"], work)

    pt2e, pt2e_wall = run_recipe(pytorch_int8_recipe(vision, run_v / "fp32", run_v / "pruned-fp32", args.quick),
                                 work / "pt2e-mobilenetv2", PT2E_QUICK if args.quick else [])
    pt2e_text, pt2e_text_wall = run_recipe(pytorch_int8_text_recipe("minilm-l6", args.quick), work / "pt2e-minilm",
                                           PT2E_TEXT_QUICK if args.quick else [])

    # The strongest fp32 a PyTorch user has: the same models through torch.compile, beside PT2E, in one process.
    compiled = {"mobilenetv2": compiled_bench(work / "pt2e-mobilenetv2", args.quick)}
    if not args.quick:  # quick: MobileNetV2 alone, each compile being tens of seconds
        compiled["minilm"] = compiled_bench(work / "pt2e-minilm", args.quick)

    v = {x["name"]: x for x in mnv2["variants"]}
    t = {x["name"]: x for x in minilm["variants"]}
    onnx_variants = [x for x in [*mnv2["variants"], *minilm["variants"]] if x["framework"] == "onnx"]
    ran = all(x["latency"].get("1", {}).get("median_ms") for x in onnx_variants)
    passed = sum(c["matched"] for c in checks) / len(checks) if ran else 0.0
    static, dynamic = t["ort-int8-static"], t["ort-int8-dynamic"]
    serving = [t[n] for n in ("ort-int8-dynamic", "ort-int8-static")]
    serving_mb = (max(x["peak_rss_bytes"] for x in serving) / 2**20
                  if all(x.get("peak_rss_bytes") and x.get("torch_imported") is False for x in serving) else None)
    targets = [
        target("every_variant_exports_matches_and_runs", passed, "==", 1.0),
        target("mobilenetv2_int8_static_latency_b1_vs_ort_fp32",
               paired_ratio(v["ort-int8-static"]["latency"]["1"], v["ort-fp32"]["latency"]["1"]), "<=", 0.75, "x"),
        target("mobilenetv2_int8_static_accuracy_drop", v["ort-int8-static"]["accuracy"]["top1_drop_pp"], "<=", 0.5, "pp"),
        target("minilm_int8_static_latency_b1_vs_int8_dynamic",
               paired_ratio(static["latency"]["1"], dynamic["latency"]["1"]), "<=", 1.0, "x"),
        target("minilm_int8_static_embedding_cosine", static["accuracy"]["cosine_mean"], ">=", 0.995),
        target("serving_peak_rss_int8_minilm_mb", serving_mb, "<=", SERVING_LIMIT_MB, "MB"),
    ]
    body = {
        "quick": args.quick, "vision_recipe": str(VISION_RECIPE.relative_to(ROOT)),
        "overrides": {"mobilenetv2": VISION_QUICK if args.quick else [], "minilm": TEXT_QUICK if args.quick else []},
        "pruned_minilm": str(pruned_minilm.relative_to(ROOT)) if pruned_minilm.is_relative_to(ROOT) else pruned_minilm.name,
        "runs_measured_at_commit": {name: _commit_of(work / name)
                                    for name in ("mobilenetv2", "minilm", "pt2e-mobilenetv2", "pt2e-minilm")},
        "mobilenetv2": variant_summary(mnv2, mnv2_wall), "minilm": variant_summary(minilm, minilm_wall),
        "export_checks": checks,
        # Not a target of the issue: PyTorch-native static int8 for users who stay in PyTorch.
        "pytorch_int8": {"summary": {**pt2e_summary(pt2e, pt2e_text), **compiled_summary(compiled)},
                         "compiled_bench": compiled,
                         "mobilenetv2": variant_summary(pt2e, pt2e_wall),
                         "minilm": variant_summary(pt2e_text, pt2e_text_wall)},
    }
    h = minilm["harness"]
    path = write_result(NAME, h["threads"], h["device"], body, targets, args.out)
    print(path.read_text())
    return 0


def pt2e_summary(vision: dict, text: dict) -> dict:
    """PT2E int8 against PyTorch fp32 (eager, the run's baseline) and ONNX Runtime, paired at
    batch 1; None for a variant the run did not have (quick runs)."""
    v = {x["name"]: x for x in vision["variants"]}
    t = {x["name"]: x for x in text["variants"]}

    def ratio(runs: dict, a: str, b: str) -> float | None:
        return paired_ratio(runs[a]["latency"]["1"], runs[b]["latency"]["1"]) if a in runs and b in runs else None

    pruned = v.get("pruned-pt2e-int8", {}).get("accuracy", {})
    return {
        "mobilenetv2_latency_b1_vs_torch_fp32": ratio(v, "pt2e-int8", "fp32"),
        "mobilenetv2_latency_b1_vs_ort_int8_static": ratio(v, "pt2e-int8", "ort-int8-static"),
        "mobilenetv2_accuracy_drop_pp": v["pt2e-int8"]["accuracy"]["top1_drop_pp"],
        "mobilenetv2_pruned_latency_b1_vs_torch_fp32": ratio(v, "pruned-pt2e-int8", "fp32"),
        "mobilenetv2_pruned_top1": pruned.get("top1"),
        "minilm_latency_b1_vs_torch_fp32": ratio(t, "pt2e-int8", "fp32"),
        "minilm_latency_b1_vs_ort_int8_static": ratio(t, "pt2e-int8", "ort-int8-static"),
        "minilm_embedding_cosine": t["pt2e-int8"]["accuracy"]["cosine_mean"],
    }


def compiled_bench(run: Path, quick: bool) -> dict:
    """``slimkit bench`` of a PT2E run folder's PyTorch variants, eager and compiled, at batch 1 and 2 threads."""
    from slimkit.benching import bench

    rounds, iters, warmup = (1, 2, 1) if quick else (MEASURE["rounds"], MEASURE["iters"], MEASURE["warmup"])
    result = bench(str(run), [MEASURE["threads"]], [1], ["torch", "compiled"], rounds=rounds, iters=iters,
                   warmup=warmup)
    return {**result, "source": run.name}


def compiled_summary(compiled: dict) -> dict:
    """PT2E int8 against torch.compile'd fp32: the ratio of each one's paired ratio to eager fp32."""
    out = {}
    for model, result in compiled.items():
        ratio = {(r["variant"], r["backend"]): r["ratio_to_reference"] for r in result["rows"]}
        out[f"{model}_latency_b1_vs_compiled_fp32"] = ratio[("pt2e-int8", "torch")] / ratio[("fp32", "compiled")]
        out[f"{model}_compiled_fp32_vs_eager_fp32"] = ratio[("fp32", "compiled")]
    return out


def _commit_of(folder: Path) -> str | None:
    stamp = folder.with_name(f"{folder.name}.commit")
    return stamp.read_text().strip() if stamp.is_file() else None


def kept_pruned_minilm() -> Path:
    """The recovered model benchmarks/prune_minilm.py keeps in its work folder."""
    found = sorted((WORK / "prune_minilm").glob("recovered-*/model"))
    if not found:
        raise SystemExit(f"{NAME}: no pruned MiniLM under {WORK / 'prune_minilm'}; run "
                         "`python benchmarks/prune_minilm.py --phase train` first, or give --pruned-minilm")
    return found[-1]


def quick_pruned_minilm(work: Path) -> Path:
    """minilm-l6 with half its heads and FFN neurons removed by weight norm, unrecovered (quick runs)."""
    from slimkit import serialize
    from slimkit.prune import TransformerPruneConfig, prune_
    from slimkit.zoo.models import load_model

    folder = work / "pruned-minilm"
    if not (folder / serialize.META).is_file():
        model = load_model("minilm-l6")
        prune_(model.module, TransformerPruneConfig(heads=0.5, ffn=0.5, importance="l1"))
        serialize.save(model, folder)
    return folder


if __name__ == "__main__":
    sys.exit(main())
