"""Activation arena: plan quality, allocations per request and peak RSS on the real models.

For minilm-l6 (sequence 128) and MobileNetV2 (224x224), in one process:

- the plan per shape bucket: the lower bound (the most bytes alive at any one step),
  the arena the planner found, and the no-reuse total (every tensor its own memory);
- outputs of the arena executor against eager PyTorch (``torch.testing.assert_close``
  with its default tolerances), on exact and padded requests;
- memory allocations per request in steady state, counted with ``torch.profiler``'s
  memory events and split into activations (an operator made its own output), workspace
  (other memory inside an operator) and other (outside every operator); eager PyTorch's
  allocations per request, counted the same way;
- latency of the executor against eager (median of interleaved rounds, not a target);

and in fresh subprocesses, one per runtime (eager PyTorch, the arena executor, ONNX
Runtime on the model slimkit exports) plus a control (eager PyTorch in a process that has
traced the model as the arena does), the peak resident memory of serving the same
requests: over the whole process, and during serving alone (the high-water mark is
reset after loading and warm-up).

    python benchmarks/memory_arena.py                      # writes benchmarks/results/memory_arena.json
    python benchmarks/memory_arena.py --quick --out PATH   # a smoke run of the same code (CI)
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Nothing heavy at module level: the ONNX Runtime child must not import torch.

SENTENCES = [
    "a gripping, beautifully shot film whose quiet final act earns every one of its tears .",
    "dull .",
    "the plot is thin and the jokes land about half the time , but the cast is clearly having fun .",
    "an ambitious , sprawling mess that never decides what kind of movie it wants to be , "
    "though a few of its set pieces are as inventive as anything in the genre this year .",
    "warm , funny and wise .",
    "it drags .",
    "a documentary that trusts its subjects and its audience , and is richer for it .",
    "by the time the twist arrives you will have guessed it twice .",
]
FULL = {"batches": [1, 8], "text_seq_buckets": [64, 128], "requests": 20, "runs": 20,
        "latency": {"rounds": 5, "iters": 5, "warmup": 2}}
QUICK = {"batches": [1, 2], "text_seq_buckets": [128], "requests": 3, "runs": 3,
         "latency": {"rounds": 1, "iters": 2, "warmup": 1}}
SEQ = 128
IMAGE = 224


# -- the child: serve in a fresh process and report its memory --------------------------


def _status() -> dict[str, int]:
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(("VmHWM:", "VmRSS:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def _settle() -> int | None:
    """Free what loading left behind, then restart the high-water mark from the current
    resident size (Linux ``clear_refs``); returns that size, or None where unsupported."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return _status().get("VmRSS")


def child(args: argparse.Namespace) -> int:
    import numpy as np

    data = dict(np.load(args.inputs))
    batches = sorted({int(k.split("_", 1)[0][1:]) for k in data})
    requests = {b: [data[k] for k in sorted(data) if k.startswith(f"b{b}_")] for b in batches}
    names = {b: [k.split("_", 1)[1] for k in sorted(data) if k.startswith(f"b{b}_")] for b in batches}
    if args.child == "ort":
        import onnxruntime as ort

        from slimkit.deploy.ort_runtime import providers, session_options

        session = ort.InferenceSession(args.onnx, session_options(args.threads), providers=providers("cpu"))

        def run(b):
            return session.run(None, dict(zip(names[b], requests[b], strict=True)))[0]
    else:
        import torch

        from slimkit.zoo.models import load_model

        torch.set_num_threads(args.threads)
        module = load_model(args.model).module.eval()
        order = {"input_ids": 0, "attention_mask": 1, "token_type_ids": 2, "input_0": 0}
        tensors = {b: [torch.from_numpy(requests[b][i]) for i in sorted(range(len(names[b])), key=lambda i: order[names[b][i]])]
                   for b in batches}
        text = len(names[batches[0]]) > 1
        if args.child == "traced":
            # Control: eager serving in a process that has also traced the model as the
            # arena does, which shows the tracing machinery's share of the arena process.
            auto = torch.export.Dim.AUTO
            dims = tuple({0: auto, 1: auto} if text else {0: auto} for _ in tensors[batches[-1]])
            torch.export.export(module, tuple(tensors[batches[-1]]), dynamic_shapes=dims).run_decompositions({})
        if args.child == "arena":
            from slimkit.memory.arena import ArenaConfig, build_arena

            config = ArenaConfig(batch_buckets=batches, seq_buckets=[tensors[batches[0]][0].shape[1]] if text else [])
            executor = build_arena(module, tensors[batches[-1]], config)
            executor.warm_up()

            def run(b):
                return executor(*tensors[b], copy=False)
        else:
            def run(b):
                with torch.inference_mode():
                    return module(*tensors[b])
    for b in batches:  # warm-up
        run(b)
    start = _settle()
    for _ in range(args.runs):
        for b in batches:
            run(b)
    status = _status()
    print(json.dumps({
        "peak_rss_bytes": status.get("VmHWM"), "serving_start_rss_bytes": start,
        "serving_peak_rss_bytes": status.get("VmHWM") if start is not None else None,
        "serving_growth_bytes": status["VmHWM"] - start if start is not None else None,
        "torch_imported": "torch" in sys.modules,
    }))
    return 0


def rss(variant: str, model: str, inputs: Path, threads: int, runs: int, onnx: Path | None = None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", variant, "--model", model,
           "--inputs", str(inputs), "--threads", str(threads), "--runs", str(runs)]
    if onnx is not None:
        cmd += ["--onnx", str(onnx)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} child for {model} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- the parent ----------------------------------------------------------------------------


def model_inputs(name: str, loaded, batch: int, seq: int = SEQ) -> dict:
    import numpy as np

    if name == "minilm-l6":
        texts = [SENTENCES[i % len(SENTENCES)] for i in range(batch)]
        enc = loaded.tokenizer(texts, padding="max_length", max_length=seq, truncation=True, return_tensors="np")
        return {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}
    rng = np.random.default_rng(batch)
    return {"input_0": rng.standard_normal((batch, 3, IMAGE, IMAGE), dtype=np.float32)}


def as_tensors(feeds: dict) -> tuple:
    import torch

    return tuple(torch.from_numpy(v) for v in feeds.values())


def eager_allocations(module, inputs, requests: int) -> float:
    import torch
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        for _ in range(2):
            module(*inputs)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            for _ in range(requests):
                module(*inputs)
    events = prof.profiler.kineto_results.events()
    return sum(1 for e in events if e.name() == "[memory]" and e.nbytes() > 0) / requests


def run_model(name: str, settings: dict, threads: int, work: Path) -> dict:
    import numpy as np
    import torch

    from slimkit.deploy.export import export
    from slimkit.measure.latency import measure_latency
    from slimkit.memory.arena import ArenaConfig, build_arena, count_allocations
    from slimkit.zoo.models import load_model

    loaded = load_model(name)
    module = loaded.module.eval()
    text = name == "minilm-l6"
    batches = settings["batches"]
    feeds = {b: model_inputs(name, loaded, b) for b in batches}
    config = ArenaConfig(batch_buckets=batches, seq_buckets=settings["text_seq_buckets"] if text else [])
    t0 = time.perf_counter()
    executor = build_arena(module, as_tensors(feeds[batches[-1]]), config)
    build_s = time.perf_counter() - t0
    if executor.fallback_reason:
        raise RuntimeError(f"{name}: the arena fell back to eager: {executor.fallback_reason}")
    summary = executor.summary()
    target_buckets = [b for b in summary["buckets"] if b["seq"] in (None, SEQ)]

    # Outputs against eager: every bucket exactly, and requests padded up to one.
    checks = []
    requests = [(b, SEQ if text else None) for b in batches] + [(batches[-1] - 1 or 1, SEQ - 28 if text else None)]
    for batch, seq in requests:
        inputs = as_tensors(model_inputs(name, loaded, batch, seq or SEQ))
        with torch.no_grad():
            ref = module(*inputs)
        got = executor(*inputs)
        try:
            torch.testing.assert_close(got, ref)
            ok = True
        except AssertionError:
            ok = False
        checks.append({"batch": batch, "seq": seq, "max_abs_diff": float((got - ref).abs().max()),
                       "assert_close": ok})

    executor.warm_up()
    allocations = {
        str(b): {k: v for k, v in count_allocations(executor, as_tensors(feeds[b]), settings["requests"]).items()}
        for b in batches
    }
    eager_allocs = {str(b): eager_allocations(module, as_tensors(feeds[b]), settings["requests"]) for b in batches}

    lat = {}
    for b in batches:
        inputs = as_tensors(feeds[b])

        def eager(inputs=inputs):
            with torch.no_grad():
                return module(*inputs)

        res = measure_latency({"eager": eager, "arena": lambda inputs=inputs: executor(*inputs, copy=False)},
                              baseline="eager", batch_size=b, **settings["latency"])
        lat[str(b)] = {v: {k: round(res[v][k], 3) for k in ("median_ms", "p10_ms", "p90_ms", "ratio_to_baseline")}
                       for v in res}

    # Peak RSS, each runtime in a fresh process serving the same requests.
    inputs_file = work / f"{name}.npz"
    np.savez(inputs_file, **{f"b{b}_{k}": v for b, f in feeds.items() for k, v in f.items()})
    onnx = export(loaded, workdir=work / f"{name}-onnx")
    executor = None  # free the arena before the children measure theirs
    gc.collect()
    peak = {
        "eager": rss("eager", name, inputs_file, threads, settings["runs"]),
        "eager_after_trace": rss("traced", name, inputs_file, threads, settings["runs"]),
        "arena": rss("arena", name, inputs_file, threads, settings["runs"]),
        "onnxruntime": rss("ort", name, inputs_file, threads, settings["runs"], onnx=onnx.path),
    }
    for v in ("eager_after_trace", "arena", "onnxruntime"):
        for key in ("peak_rss_bytes", "serving_peak_rss_bytes"):
            if peak[v].get(key) and peak["eager"].get(key):
                peak[v][key.replace("_bytes", "_vs_eager")] = round(peak[v][key] / peak["eager"][key], 3)

    return {
        "model": name,
        "input": {"seq_len": SEQ, "batches": batches} if text else {"image": [3, IMAGE, IMAGE], "batches": batches},
        "config": config.to_dict(),
        "build_seconds": round(build_s, 1),
        "arena_bytes": summary["arena_bytes"],
        "staging_bytes": summary["staging_bytes"],
        "buckets": summary["buckets"],
        "target_buckets": [{k: b[k] for k in ("batch", "seq", "lower_bound_bytes", "arena_bytes", "no_reuse_bytes",
                                              "ratio_to_lower_bound", "strategy")} for b in target_buckets],
        "max_ratio_to_lower_bound": max(b["ratio_to_lower_bound"] for b in target_buckets),
        "outputs_vs_eager": checks,
        "allocations_per_request": {"arena": allocations, "eager_total": eager_allocs},
        "latency": lat,
        "peak_rss": peak,
        "onnx": {"optimize": "auto", "file_bytes": onnx.path.stat().st_size},
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer buckets and requests: checks the script runs")
    p.add_argument("--out", type=Path, help="result file (default benchmarks/results/memory_arena.json; --quick needs it)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads for every runtime (default 1)")
    p.add_argument("--child", choices=["eager", "traced", "arena", "ort"], help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--inputs", help=argparse.SUPPRESS)
    p.add_argument("--onnx", help=argparse.SUPPRESS)
    p.add_argument("--runs", type=int, default=20, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    if args.quick and args.out is None:
        p.error("--quick results are not benchmark results: give --out PATH")

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import target, write_result

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    settings = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory(prefix="slimkit-arena-") as tmp:
        models = [run_model(name, settings, args.threads, Path(tmp)) for name in ("minilm-l6", "mobilenet-v2")]
    by = {m["model"]: m for m in models}

    def activation_allocs(m):
        return max(a["activation"] for a in m["allocations_per_request"]["arena"].values())

    mismatches = sum(not c["assert_close"] for m in models for c in m["outputs_vs_eager"])
    targets = [
        target("minilm_l6_seq128_arena_over_lower_bound", by["minilm-l6"]["max_ratio_to_lower_bound"], "<=", 1.05, "x"),
        target("mobilenet_v2_224_arena_over_lower_bound", by["mobilenet-v2"]["max_ratio_to_lower_bound"], "<=", 1.05, "x"),
        target("minilm_l6_activation_allocations_per_request", activation_allocs(by["minilm-l6"]), "<=", 0, "allocations"),
        target("mobilenet_v2_activation_allocations_per_request", activation_allocs(by["mobilenet-v2"]), "<=", 0,
               "allocations"),
        target("outputs_not_matching_eager", mismatches, "<=", 0, "requests"),
    ]
    body = {
        "quick": args.quick,
        "settings": {k: v for k, v in settings.items()},
        "rss_method": "fresh process per runtime; peak_rss_bytes is VmHWM over the whole process (loading and "
                      "tracing included); serving_* restart the high-water mark (clear_refs) after loading, "
                      "warm-up, gc and malloc_trim, then serve every batch size runs times",
        "models": models,
    }
    path = write_result("memory_arena", args.threads, "cpu", body, targets, args.out)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
