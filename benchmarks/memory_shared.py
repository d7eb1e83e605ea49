"""Weights shared across processes (memory mapping) and across models (a content-addressed store).

1. Four processes serve a BERT-base-sized encoder (12 layers, hidden 768, random init,
   seeded) saved by slimkit: each loads it, runs forward passes at batch 1, sequence 128,
   one thread, reads every weight once (so all of them are resident, as in a server that
   has seen many requests) and waits; the parent reads every process's proportional set
   size (PSS) while all four are alive. Three modes: ``shared`` (memory-mapped,
   slimkit.memory.shared_weights.load_shared), ``private`` (slimkit.load, weights copied
   into each process) and ``noweights`` (the same imports, no model).
2. Three minilm-l6 task models (the real offline encoder, frozen, with seeded heads of 2,
   3 and 5 classes) in a weight store: its size on disk against one model's safetensors
   file, and the PSS of one process that loads all three from the store against one that
   loads one (from a copy of the store), each less a process with the same imports and no
   model, all three measured at the same moment.
3. Two processes put the same three models into one new store at the same time; then
   every object is checked against its hash.

    python benchmarks/memory_shared.py                        # -> benchmarks/results/memory_shared.json
    python benchmarks/memory_shared.py --quick --out /tmp/q.json   # small BERT, 2 processes (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from slimkit.memory.shared_weights import (
    build_skeleton,
    empty_weights,
    load_shared,
    measure_together,
    ready_for_measurement,
)
from slimkit.memory.store import WeightStore

# The parent alone imports the result helpers (slimkit.runner and what it pulls in): a
# serving process would not, and the workers' memory is what is measured.
sys.path.insert(0, str(Path(__file__).resolve().parent))

BERT_BASE = {"num_hidden_layers": 12, "hidden_size": 768, "num_attention_heads": 12, "intermediate_size": 3072}
BERT_SMALL = {"num_hidden_layers": 2, "hidden_size": 256, "num_attention_heads": 4, "intermediate_size": 1024}
HEADS = {"minilm-sentiment": 2, "minilm-topic3": 3, "minilm-topic5": 5}
SEQ, THREADS = 128, 1
MiB = 1024 * 1024


class TaskModel(nn.Module):
    """A frozen sentence encoder and one task's linear head."""

    def __init__(self, encoder: nn.Module, classes: int, hidden: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(hidden, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(input_ids, attention_mask))


def inputs(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1000, vocab, (1, SEQ), generator=torch.Generator().manual_seed(0))
    return ids, torch.ones_like(ids)


def serve(module: nn.Module, vocab: int, runs: int) -> dict:
    """Forward passes, then read every weight so that all of it is resident."""
    ids, mask = inputs(vocab)
    with torch.inference_mode():
        t0 = time.perf_counter()
        for _ in range(runs):
            out = module(ids, mask)
        forward_ms = (time.perf_counter() - t0) / runs * 1e3
        touched = sum(float(t.float().sum()) for t in [*module.parameters(), *module.buffers()])
    return {"output_sum": float(out.double().sum()), "forward_ms": forward_ms, "weights_sum": touched}


# -- workers (this script run as a child process) ------------------------------------------


def worker_bert(mode: str, folder: str, runs: int) -> None:
    import transformers.models.bert.modeling_bert  # noqa: F401  (the same imports in every mode)

    from slimkit.serialize import load

    torch.set_num_threads(THREADS)
    if mode == "noweights":
        ready_for_measurement({"mode": mode})
        return
    t0 = time.perf_counter()
    model = load_shared(folder) if mode == "shared" else load(folder)
    load_s = time.perf_counter() - t0
    vocab = model.spec["hf_config"]["vocab_size"]
    ready_for_measurement({"mode": mode, "load_s": load_s, **serve(model.module, vocab, runs)})


def build_task_skeleton(spec: dict, classes: int) -> TaskModel:
    encoder = build_skeleton({"spec": spec, "transforms": []}).module
    with empty_weights():
        return TaskModel(encoder, classes, spec["hf_config"]["hidden_size"]).eval()


def worker_store(mode: str, store_dir: str, names: list[str], runs: int, files: str) -> None:
    import transformers.models.bert.modeling_bert  # noqa: F401

    from slimkit.zoo.models import build_from_spec

    torch.set_num_threads(THREADS)
    if mode == "baseline":
        ready_for_measurement({"mode": mode})
        return
    store = WeightStore(store_dir)
    t0 = time.perf_counter()
    models = []
    for name in names:
        m = store.manifest(name)["meta"]
        if mode == "store":
            models.append(store.load_into(name, build_task_skeleton(m["spec"], m["classes"])))
        else:  # private: built and initialised as usual, then the weights copied in
            from safetensors.torch import load_file

            task = TaskModel(build_from_spec(m["spec"]).module, m["classes"], m["spec"]["hf_config"]["hidden_size"])
            task.load_state_dict(load_file(Path(files) / f"{name}.safetensors"))
            models.append(task.eval())
    load_s = time.perf_counter() - t0
    results = [serve(m, 30000, runs) for m in models]
    ready_for_measurement({"mode": mode, "models": len(models), "load_s": load_s,
                           "output_sums": [r["output_sum"] for r in results]})


def worker_put(store_dir: str, go: str, rounds: int) -> None:
    from slimkit.zoo.models import load_model

    models = task_models(load_model("minilm-l6"))
    Path(f"{go}.ready.{os.getpid()}").touch()
    while not Path(go).exists():
        time.sleep(0.01)
    written = reused = 0
    for _ in range(rounds):
        for name, (task, meta) in models.items():
            r = WeightStore(store_dir).put(name, task, meta=meta)
            written, reused = written + r.objects_written, reused + r.objects_reused
    print(json.dumps({"objects_written": written, "objects_reused": reused}))


def task_models(encoder_model) -> dict[str, tuple[TaskModel, dict]]:
    hidden = encoder_model.spec["hf_config"]["hidden_size"]
    out = {}
    for name, k in HEADS.items():
        torch.manual_seed(100 + k)
        task = TaskModel(encoder_model.module, k, hidden).eval()
        out[name] = (task, {"spec": encoder_model.spec, "classes": k})
    return out


# -- the parent ------------------------------------------------------------------------------


def child(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--worker", *args]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(THREADS), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def bench_processes(tmp: Path, quick: bool) -> tuple[dict, list[dict]]:
    from _common import target
    from transformers import BertConfig, BertModel

    from slimkit.serialize import save
    from slimkit.zoo.models import LoadedModel, TextEncoder

    shape = BERT_SMALL if quick else BERT_BASE
    n, runs = (2, 2) if quick else (4, 3)
    cfg = BertConfig(vocab_size=30522, max_position_embeddings=512, **shape)
    torch.manual_seed(0)
    model = LoadedModel(TextEncoder(BertModel(cfg)).eval(), {"kind": "hf", "hf_config": cfg.to_dict(), "pooling": "mean"})
    folder = tmp / "bert"
    save(model, folder)
    params = sum(p.numel() for p in model.module.parameters())
    weights = sum(t.numel() * t.element_size() for t in model.module.state_dict().values())
    del model
    modes = {}
    for mode in ("shared", "private", "noweights"):
        procs = measure_together([child("bert", mode, str(folder), str(runs))] * n, env=env(), files=[folder])
        modes[mode] = {"pss_bytes": [p.pss for p in procs], "rss_bytes": [p.rss for p in procs],
                       "uss_bytes": [p.uss for p in procs], "total_pss_bytes": sum(p.pss for p in procs),
                       "weights_file_rss_bytes": [p.files.get("Rss", 0) for p in procs],
                       "weights_file_pss_total_bytes": sum(p.files.get("Pss", 0) for p in procs),
                       "load_s": [p.info.get("load_s") for p in procs],
                       "forward_ms": [p.info.get("forward_ms") for p in procs],
                       "output_sum": procs[0].info.get("output_sum")}
    total = {m: v["total_pss_bytes"] for m, v in modes.items()}
    body = {"config": {**shape, "vocab_size": 30522, "params": params}, "weights_bytes": weights,
            "processes": n, "forward_runs": runs, "batch": 1, "seq_len": SEQ,
            "outputs_agree": abs(modes["shared"]["output_sum"] - modes["private"]["output_sum"])
            <= 1e-4 * max(1.0, abs(modes["private"]["output_sum"])),
            "modes": modes,
            "shared_vs_private_pss_ratio": total["shared"] / total["private"],
            "shared_minus_noweights_vs_weights": (total["shared"] - total["noweights"]) / weights,
            "private_minus_noweights_vs_weights": (total["private"] - total["noweights"]) / weights}
    targets = [target("shared_vs_private_pss_ratio", body["shared_vs_private_pss_ratio"], "<=", 0.6, "x"),
               target("shared_minus_noweights_pss_vs_weights", body["shared_minus_noweights_vs_weights"], "<=", 1.25, "x")]
    return body, targets


def disk_bytes(paths) -> tuple[int, int]:
    """Apparent size and allocated blocks of files."""
    apparent = allocated = 0
    for p in paths:
        st = Path(p).stat()
        apparent, allocated = apparent + st.st_size, allocated + st.st_blocks * 512
    return apparent, allocated


def bench_store(tmp: Path, quick: bool) -> tuple[dict, list[dict]]:
    from _common import target
    from safetensors.torch import save_model

    from slimkit.zoo.models import load_model

    runs = 1 if quick else 3
    encoder = load_model("minilm-l6")
    models = task_models(encoder)
    store_dir = tmp / "store"
    store = WeightStore(store_dir)
    puts = {name: store.put(name, task, meta=meta).__dict__ for name, (task, meta) in models.items()}
    one_name = next(iter(HEADS))
    files = tmp / "safetensors"  # each model saved alone, as without a store
    files.mkdir()
    for name, (task, _) in models.items():
        save_model(task, str(files / f"{name}.safetensors"))
    one_file = files / f"{one_name}.safetensors"
    stats = store.stats()
    store_files = [p for p in store_dir.rglob("*") if p.is_file() and p.parent.name != "tmp"]
    store_apparent, store_allocated = disk_bytes(store_files)
    one_apparent, one_allocated = disk_bytes([one_file])
    del encoder, models

    # All measured at once, so that each has the same share of the libraries' pages (other
    # processes on the machine that map torch change that share over time). The one-model
    # process reads a copy of the store: processes mapping the same objects would split
    # those pages between them.
    copy_dir = tmp / "store-copy"
    shutil.copytree(store_dir, copy_dir)
    group = {"baseline": ("baseline", store_dir, []), "store_one": ("store", copy_dir, [one_name]),
             "store_three": ("store", store_dir, list(HEADS))}
    if not quick:  # for comparison: each model loaded on its own, as without a store
        group |= {"private_one": ("private", store_dir, [one_name]), "private_three": ("private", store_dir, list(HEADS))}
    procs = measure_together([child("store", mode, str(d), ",".join(names), str(runs), str(files))
                              for mode, d, names in group.values()], env=env(), files=[store_dir, copy_dir])
    mem = {k: {"pss_bytes": p.pss, "rss_bytes": p.rss, "store_file_rss_bytes": p.files.get("Rss", 0),
               "store_file_pss_bytes": p.files.get("Pss", 0), **p.info} for k, p in zip(group, procs, strict=True)}
    base = mem["baseline"]["pss_bytes"]
    above = {k: v["pss_bytes"] - base for k, v in mem.items() if k != "baseline"}
    agree = None if quick else all(
        abs(a - b) <= 1e-4 * max(1.0, abs(b))
        for a, b in zip(mem["store_three"]["output_sums"], mem["private_three"]["output_sums"], strict=True))
    body = {"models": {n: {"classes": k} for n, k in HEADS.items()}, "puts": puts,
            "stats": {**stats.__dict__, "dedup_ratio": stats.dedup_ratio},
            "disk": {"store_apparent_bytes": store_apparent, "store_allocated_bytes": store_allocated,
                     "one_model_apparent_bytes": one_apparent, "one_model_allocated_bytes": one_allocated,
                     "ratio_allocated": store_allocated / one_allocated, "ratio_apparent": store_apparent / one_apparent},
            "memory": {**mem, "pss_above_baseline_bytes": above,
                       "ratio_three_vs_one_store": above["store_three"] / above["store_one"],
                       "ratio_three_vs_one_private": None if quick else above["private_three"] / above["private_one"],
                       "outputs_agree_with_private": agree}}
    targets = [target("store_three_models_disk_vs_one", body["disk"]["ratio_allocated"], "<=", 1.05, "x"),
               target("store_three_models_memory_vs_one", body["memory"]["ratio_three_vs_one_store"], "<=", 1.05, "x")]
    return body, targets


def bench_writers(tmp: Path, quick: bool) -> tuple[dict, list[dict]]:
    import subprocess

    from _common import target

    store_dir, go = tmp / "concurrent-store", tmp / "go"
    rounds = 1 if quick else 3
    procs = [subprocess.Popen(child("put", str(store_dir), str(go), str(rounds)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env()) for _ in range(2)]
    # Both writers load minilm-l6 first; release them together, into a store neither has created.
    deadline = time.monotonic() + 900
    while len(list(tmp.glob("go.ready.*"))) < 2 and all(p.poll() is None for p in procs):
        if time.monotonic() > deadline:
            raise SystemExit("the concurrent writers did not get ready in 900 s")
        time.sleep(0.05)
    go.touch()
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=900)
        if p.returncode != 0:
            raise SystemExit(f"a concurrent writer failed:\n{err[-3000:]}")
        outs.append(json.loads(out.strip().splitlines()[-1]))
    report = WeightStore(store_dir).verify()
    body = {"writers": 2, "rounds": rounds, "writer_reports": outs, "objects_checked": report.objects_checked,
            "bytes_checked": report.bytes_checked, "corrupt_objects": len(report.problems),
            "bad_manifests": report.bad_manifests, "unreferenced_objects": len(report.unreferenced),
            "leftover_temp_files": len(list((store_dir / "tmp").iterdir()))}
    corrupt = len(report.problems) + len(report.bad_manifests) + body["leftover_temp_files"]
    return body, [target("concurrent_writers_corrupt_objects", float(corrupt), "<=", 0.0)]


PARTS = {"processes": bench_processes, "store": bench_store, "concurrent_writers": bench_writers}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small BERT, two processes: checks the script runs")
    p.add_argument("--out", type=Path, help="result file (default benchmarks/results/memory_shared.json; --quick needs it)")
    p.add_argument("--part", choices=PARTS, action="append",
                   help="run only this part (repeatable); a partial result needs --out")
    p.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        kind, *rest = args.worker
        if kind == "bert":
            worker_bert(rest[0], rest[1], int(rest[2]))
        elif kind == "store":
            worker_store(rest[0], rest[1], [n for n in rest[2].split(",") if n], int(rest[3]), rest[4])
        else:
            worker_put(rest[0], rest[1], int(rest[2]))
        return 0
    if (args.quick or args.part) and args.out is None:
        p.error("--quick and --part results are not benchmark results: give --out PATH")
    if not Path("/proc/self/smaps_rollup").exists():
        p.error("PSS is read from /proc/PID/smaps_rollup: this benchmark needs Linux")
    from _common import write_result

    parts = args.part or list(PARTS)
    sections, targets, seconds = {}, [], {}
    with tempfile.TemporaryDirectory(prefix="slimkit-bench-") as tmp:
        for part in parts:
            t0 = time.perf_counter()
            sections[part], t = PARTS[part](Path(tmp), args.quick)
            targets += t
            seconds[part] = round(time.perf_counter() - t0, 1)
    body = {"quick": args.quick, **sections, "seconds": seconds,
            "method": "PSS from /proc/PID/smaps_rollup, read by the parent while every process of a group is alive "
                      "and idle; each process reads every weight once after its forward passes"}
    path = write_result("memory_shared", THREADS, "cpu", body, targets, args.out)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
