"""The shipped vision recipe, end to end with ``slimkit run``, on MobileNetV2 and on a user's CNN.

``recipes/mobilenetv2-fashion.yaml`` fine-tunes MobileNetV2 (ImageNet weights) on
Fashion-MNIST at 128x128, prunes its channels to at most 0.6x the MACs, recovers it with
the fine-tuned model as teacher, exports it and quantizes it to static int8 for ONNX
Runtime, and measures it beside the fine-tuned model in PyTorch (the baseline) and under
ONNX Runtime in fp32 and int8. This script runs that recipe through the command line,
exactly as a user would, then runs it again with only ``model:`` changed to a user CNN
given as ``package.module:function`` (``benchmarks/user_models.py``).

Everything that learns (fine-tuning, early stopping, the pruning analysis, recovery,
calibration) uses the train split; accuracy is on the full 10,000-image test split.
Latency ratios are taken within one run (one process, interleaved rounds).

    python benchmarks/vision_recipe.py                        # both runs -> benchmarks/results/vision_recipe.json
    python benchmarks/vision_recipe.py --quick --out /tmp/q.json   # a smoke run of the same code (CI)

Run folders are kept under --work; a run that was interrupted resumes its training from
the checkpoints beside its folder when the script is started again, and a finished run is
read instead of run again (delete the folder to run it anew).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import target, work_folder, write_result  # noqa: E402

from slimkit.measure.latency import paired_ratio  # noqa: E402

NAME = "vision_recipe"
ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "mobilenetv2-fashion.yaml"
OUTPUT = "pruned-int8"
USER_MODEL = "user_models:small_resnet"
# The same pipeline on a slice of the data and a few steps: checks the script and the recipe run.
QUICK = [
    "task.train_limit=600", "task.test_limit=200", "task.image_size=64",
    "prepare.0.train.max_steps=4", "prepare.0.train.validation=64", "prepare.0.train.eval_every=2",
    "stages.0.prune.budget.images=32", "stages.0.prune.budget.ratios=[0.5]", "stages.0.prune.importance=l1",
    "stages.1.train.max_steps=2", "stages.1.train.validation=64", "stages.1.train.eval_every=2",
    "stages.3.quantize.calibration_samples=16", "compare.1.stages.1.quantize.calibration_samples=16",
    "measure.rounds=2", "measure.iters=3", "measure.warmup=1", "measure.batch_sizes=[1]",
]


def run_recipe(folder: Path, overrides: list[str]) -> tuple[dict, float | None]:
    """``slimkit run`` the recipe into ``folder`` (or read the finished run there); its metrics and wall time."""
    if (folder / "metrics.json").is_file():
        return json.loads((folder / "metrics.json").read_text()), None
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "slimkit.cli", "run", str(RECIPE), *overrides, "-o", str(folder)]
    if not sys.stderr.isatty():
        cmd.append("--no-progress")
    started = time.time()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        print(f"{NAME}: `slimkit run` failed for {folder.name} (exit {proc.returncode})", file=sys.stderr)
        sys.exit(proc.returncode)
    return json.loads((folder / "metrics.json").read_text()), time.time() - started


def summary(metrics: dict, wall: float | None) -> dict:
    """What the result file keeps of a run: every variant's accuracy, latency, size, memory, energy, training."""
    return {
        "model": metrics["recipe"], "wall_seconds": wall, "task": metrics["task"],
        "harness": {k: metrics["harness"][k] for k in ("threads", "batch_sizes", "rounds", "iters", "warmup", "device")},
        "variants": [
            {"name": v["name"], "framework": v["framework"], "stages": [s["kind"] + ":" + s["method"] for s in v["stages"]],
             "accuracy": v["accuracy"], "size_bytes": v["size_bytes"], "peak_rss_bytes": v["peak_rss_bytes"],
             "macs": (v.get("energy") or {}).get("macs"),
             "energy_estimate_mj": (v.get("energy") or {}).get("estimate_mj"),
             "latency": {b: {k: s[k] for k in ("median_ms", "p10_ms", "p90_ms", "ratio_to_baseline")}
                         for b, s in v["latency"].items()},
             "training": [{k: t.get(k) for k in ("stage", "teacher", "steps", "images_seen", "seconds", "best",
                                                 "stopped_early")} for t in v.get("training") or []],
             "pruned_macs_ratio": (v["pruning"][0]["choice"]["cost"] / v["pruning"][0]["choice"]["total"]
                                   if v.get("pruning") else None)}
            for v in metrics["variants"]
        ],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a slice of the data and a few steps: checks the script runs")
    p.add_argument("--out", type=Path, help="result file (default benchmarks/results/vision_recipe.json; --quick needs it)")
    p.add_argument("--work", type=Path, help="where the run folders are kept (default .bench-work/vision_recipe)")
    args = p.parse_args()
    if args.quick and args.out is None:
        p.error("--quick results are not benchmark results: give --out PATH")
    work = work_folder(NAME, args.quick, args.work)
    extra = QUICK if args.quick else []
    mnv2, mnv2_wall = run_recipe(work / "mobilenetv2", extra)
    user, user_wall = run_recipe(work / "user-cnn", [f"model={USER_MODEL}", *extra])

    v = {x["name"]: x for x in mnv2["variants"]}
    out, ort_fp32 = v[OUTPUT], v["ort-fp32"]
    u = {x["name"]: x for x in user["variants"]}
    user_ran = float(sorted(u) == sorted(v) and all(x.get("accuracy") for x in u.values()))
    targets = [
        target("accuracy_drop_vs_finetuned_fp32", out["accuracy"]["top1_drop_pp"], "<=", 1.0, "pp"),
        target("ort_int8_latency_b1_vs_unpruned_ort_fp32", paired_ratio(out["latency"]["1"], ort_fp32["latency"]["1"]),
               "<=", 0.5, "x"),
        target("same_recipe_runs_on_a_user_cnn", user_ran, "==", 1.0),
    ]
    body = {
        "recipe": str(RECIPE.relative_to(ROOT)), "output_variant": OUTPUT, "user_model": USER_MODEL, "quick": args.quick,
        "overrides": extra, "mobilenetv2": summary(mnv2, mnv2_wall), "user_cnn": summary(user, user_wall),
    }
    h = mnv2["harness"]
    path = write_result(NAME, h["threads"], h["device"], body, targets, args.out)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
