"""BERT int8 end to end: minilm-l6 on rt-polarity, five variants in one run.

fp32 eager PyTorch (the baseline), PyTorch dynamic int8 and ONNX Runtime dynamic int8 with
their default settings (per-tensor weights), ONNX Runtime fp32, and slimkit's int8 (fused
attention graph, per-channel weights, int8 embeddings), all measured by the same harness
at batch 1 and 8, sequence 128, on the full fixed test split. A sixth variant shows what
keeping the four most sensitive layers in fp32 costs and buys.

    python benchmarks/bert_int8.py            # full run, writes benchmarks/results/bert_int8.json
    python benchmarks/bert_int8.py --quick    # a smoke run of the same code (CI)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import target, write_result  # noqa: E402

from slimkit.measure.latency import paired_ratio  # noqa: E402
from slimkit.recipe import Recipe  # noqa: E402
from slimkit.runner import run  # noqa: E402

OUTPUT = "slimkit-int8"
RECIPE = {
    "version": 1,
    "name": "bert-int8-benchmark",
    "model": "minilm-l6",
    "task": {"source": "rt-polarity"},
    "variant": OUTPUT,
    "stages": [
        {"export": {"optimize": "auto"}},
        {"quantize": {"method": "ort_dynamic_int8", "per_channel": True, "quantize_embeddings": True}},
    ],
    "compare": [
        {"name": "torch-dynamic-int8", "stages": [{"quantize": {"method": "dynamic_int8", "granularity": "per_tensor"}}]},
        {"name": "ort-fp32", "stages": [{"export": {"optimize": "none"}}]},
        {"name": "ort-dynamic-int8", "stages": [
            {"export": {"optimize": "none"}},
            {"quantize": {"method": "ort_dynamic_int8", "per_channel": False}},
        ]},
        # What the sensitivity fallback buys: the four layers that move the output most
        # (scored on train-split sentences) stay fp32. Not a target, a trade-off to show.
        {"name": "slimkit-int8-fallback4", "stages": [
            {"export": {"optimize": "auto"}},
            {"quantize": {"method": "ort_dynamic_int8", "fallback_layers": 4}},
        ]},
    ],
    "measure": {"batch_sizes": [1, 8], "seq_len": 128, "threads": 2, "rounds": 25, "iters": 5, "warmup": 5},
}
QUICK = {"task": {"source": "rt-polarity", "train_limit": 200, "test_limit": 100},
         "measure": {"batch_sizes": [1, 8], "seq_len": 128, "threads": 2, "rounds": 1, "iters": 2, "warmup": 1},
         # The fallback's sensitivity scoring was most of the quick run: score on 4 sentences, not 32.
         "compare": [v if v["name"] != "slimkit-int8-fallback4" else
                     {**v, "stages": [v["stages"][0], {"quantize": {**v["stages"][1]["quantize"], "fallback_samples": 4}}]}
                     for v in RECIPE["compare"]]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny subset and one round: checks the script runs")
    p.add_argument("--out", type=Path, help="result file (default benchmarks/results/bert_int8.json; --quick needs it)")
    args = p.parse_args()
    if args.quick and args.out is None:
        p.error("--quick results are not benchmark results: give --out PATH")
    raw = {**RECIPE, **(QUICK if args.quick else {})}
    recipe = Recipe.from_dict(raw)
    with tempfile.TemporaryDirectory(prefix="slimkit-bench-") as tmp:
        folder = run(recipe, Path(tmp) / "run", progress=sys.stderr.isatty())
        metrics = json.loads((folder / "metrics.json").read_text())
    v = {x["name"]: x for x in metrics["variants"]}
    ours, peer = v[OUTPUT], v["ort-dynamic-int8"]
    acc = ours["accuracy"]
    targets = [
        target("latency_b1_vs_fp32_eager", ours["latency"]["1"]["ratio_to_baseline"], "<=", 0.35, "x"),
        target("latency_b1_vs_ort_dynamic_int8", paired_ratio(ours["latency"]["1"], peer["latency"]["1"]), "<=", 1.1, "x"),
        target("embedding_cosine_mean", acc["cosine_mean"], ">=", 0.99),
        target("frozen_head_accuracy_drop", acc["frozen_head_drop_pp"], "<=", 1.0, "pp"),
        target("size_vs_fp32_safetensors", ours["size_ratio"], "<=", 0.35, "x"),
        target("peak_rss_vs_fp32_eager", ours["rss_ratio"], "<=", 0.5, "x"),
    ]
    summary = {
        "task": metrics["task"],
        "harness": {k: metrics["harness"][k] for k in ("seq_len", "batch_sizes", "rounds", "iters", "warmup", "device")},
        "output_variant": OUTPUT,
        "quick": args.quick,
        "variants": [
            {k: x[k] for k in ("name", "framework", "size_bytes", "size_ratio", "peak_rss_bytes", "rss_ratio",
                               "torch_imported", "accuracy", "stages")}
            | {"latency": {b: {k: s[k] for k in ("median_ms", "p10_ms", "p90_ms", "ratio_to_baseline", "throughput_per_s")}
                           for b, s in x["latency"].items()},
               "energy_estimate_mj": (x.get("energy") or {}).get("estimate_mj")}
            for x in metrics["variants"]
        ],
    }
    path = write_result("bert_int8", metrics["harness"]["threads"], metrics["harness"]["device"], summary, targets, args.out)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
