"""Parallel training on this machine: equality with one process, and a BERT-base-sized
model's memory per process and step time under each strategy at 1 and 2 processes.

Equality: :func:`slimkit.parallel.selfcheck.check` launches every strategy on tiny seeded
models (2 processes; FSDP x TP on 4) and compares gradients and parameters after a few
optimizer steps with one process on the same global batches; a run whose rank 1 is
killed (SIGKILL) mid-way resumes to the parameters of an uninterrupted run.

Memory and speed: a BERT-base-sized classifier (12 layers, 768 wide, 12 heads, 110M
parameters, random weights: only the shapes matter here) trains with AdamW on random
token ids, global batch 8 x 128 tokens, through the one training loop under each
strategy. Each process reports what it holds for training (parameters, gradients and
optimizer state, counted shard by shard), its peak RSS and the median time of its
optimizer steps after one warm-up step. This machine has 2 cores: 2 processes share
them (one thread each), so step times show the strategies' overheads, not scaling; the
advisor's estimates for real clusters are in docs/parallel-scaling.md.

    python benchmarks/parallel.py                           # -> benchmarks/results/parallel.json
    python benchmarks/parallel.py --quick --out /tmp/q.json # 2 small layers, 2 steps (CI)
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import target, write_result  # noqa: E402

from slimkit.atomic import write_json  # noqa: E402
from slimkit.distill import DistillConfig, DistillData, LossTerm  # noqa: E402
from slimkit.distill.trainer import Distiller  # noqa: E402
from slimkit.parallel import selfcheck  # noqa: E402
from slimkit.parallel.advisor import ModelFootprint, advise  # noqa: E402
from slimkit.parallel.config import ParallelConfig  # noqa: E402
from slimkit.parallel.launch import launch  # noqa: E402
from slimkit.parallel.memory import training_state_bytes  # noqa: E402

NAME = "parallel"
BERT_BASE = {"layers": 12, "hidden": 768, "heads": 12, "intermediate": 3072}
SMALL = {"layers": 2, "hidden": 128, "heads": 4, "intermediate": 256}
# (label, processes, parallel settings)
CONFIGS = [
    ("none", 1, {"strategy": "none"}),
    ("fsdp", 1, {"strategy": "fsdp", "nproc": 1}),
    ("ddp", 2, {"strategy": "ddp", "nproc": 2}),
    ("ddp+zero1", 2, {"strategy": "ddp", "nproc": 2, "zero1": True}),
    ("fsdp", 2, {"strategy": "fsdp", "nproc": 2}),
    ("fsdp bf16", 2, {"strategy": "fsdp", "nproc": 2, "mixed_precision": "bf16"}),
    ("tp", 2, {"strategy": "tp", "nproc": 2}),
    ("pipeline", 2, {"strategy": "pipeline", "nproc": 2}),
]


class BertClassifier(torch.nn.Module):
    def __init__(self, layers: int, hidden: int, heads: int, intermediate: int, seq_len: int):
        super().__init__()
        from transformers import BertConfig, BertModel

        torch.manual_seed(0)
        config = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                            intermediate_size=intermediate, max_position_embeddings=max(512, seq_len),
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        self.backbone = BertModel(config, add_pooling_layer=False)
        self.head = torch.nn.Linear(hidden, 2)

    def forward(self, input_ids, attention_mask):
        return self.head(self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0])


def step_job(strategy, job_dir: Path, shape: dict, batch: int, seq_len: int, steps: int, label: str) -> None:
    """In each worker: train the classifier ``steps`` + 1 optimizer steps; report memory and step times."""
    model = BertClassifier(**shape, seq_len=seq_len)
    g = torch.Generator().manual_seed(0)
    n = batch * (steps + 1)
    ids = torch.randint(1000, 20000, (n, seq_len), generator=g)
    data = DistillData({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, labels=torch.randint(0, 2, (n,), generator=g))
    stamps: list[float] = []
    config = DistillConfig(losses=[LossTerm(kind="hard_ce")], lr=1e-4, max_steps=steps + 1, batch_size=batch)
    d = Distiller(None, model, data, config, progress=False, strategy=strategy,
                  on_step=lambda step, _m: stamps.append(time.perf_counter()))
    started = time.perf_counter()
    d.run()
    times = [b - a for a, b in zip([started, *stamps[:-1]], stamps, strict=True)][1:]  # after one warm-up step
    write_json(job_dir / f"{label}.{strategy.rank}.json", {
        "state": training_state_bytes(d.trainable, d.opt), "step_seconds": statistics.median(times),
        "step_seconds_all": times, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024})


def measure_strategies(folder: Path, shape: dict, batch: int, seq_len: int, steps: int) -> list[dict]:
    rows = []
    for label, nproc, settings in CONFIGS:
        config = ParallelConfig(**{"nproc": nproc, **settings})
        name = f"{label.replace(' ', '_')}.{nproc}"
        launch(folder / name, f"{Path(__file__).resolve()}:step_job", config,
               {"shape": shape, "batch": batch, "seq_len": seq_len, "steps": steps, "label": name},
               threads=1 if nproc > 1 else 2)
        ranks = [json.loads((folder / name / f"{name}.{r}.json").read_text()) for r in range(nproc)]
        rows.append({"strategy": label, "processes": nproc, "settings": settings,
                     "per_rank": [{"state_bytes": r["state"], "peak_rss": r["peak_rss"],
                                   "step_seconds": r["step_seconds"]} for r in ranks],
                     "state_bytes_max": max(r["state"]["total"] for r in ranks),
                     "step_seconds": max(r["step_seconds"] for r in ranks)})
        print(json.dumps({k: rows[-1][k] for k in ("strategy", "processes", "state_bytes_max", "step_seconds")}))
    return rows


def on_paper() -> dict:
    """The advisor's estimates for targets this machine is not: BERT-large and a
    1B-parameter transformer on 8 x 80 GB GPUs (formula footprints), and MobileNetV2 at
    224x224 on a 16 GB edge GPU (its footprint measured here on a training step)."""
    from slimkit.parallel.advisor import render
    from slimkit.parallel.footprint import measure_footprint
    from slimkit.zoo import load_model

    bert_large = ModelFootprint.transformer(24, 1024, 16, 4096, seq_len=512, description="BERT-large, 512 tokens")
    bert_large_bf16 = ModelFootprint.transformer(24, 1024, 16, 4096, seq_len=512, activation_bytes=2,
                                                 description="BERT-large, 512 tokens, bf16 activations")
    one_b = ModelFootprint.transformer(24, 2048, 16, 8192, vocab=50304, seq_len=2048, positions=2048,
                                       activation_bytes=2, description="1.3B-parameter transformer, 2048 tokens, bf16")
    mnv2 = load_model("mobilenet-v2").module.train()
    measured = measure_footprint(mnv2, torch.randn(1, 3, 224, 224), examples=1,
                                 description="MobileNetV2, 224x224 (measured on this machine)")
    cases = {
        "bert_large_8x80GB_batch256_fp32": advise(bert_large, 8, 80e9, 256),
        "bert_large_8x80GB_batch256_bf16": advise(bert_large_bf16, 8, 80e9, 256, mixed_precision="bf16"),
        "transformer_1.3B_8x80GB_batch64_bf16": advise(one_b, 8, 80e9, 64, mixed_precision="bf16"),
        "transformer_1.3B_8x80GB_batch512_bf16": advise(one_b, 8, 80e9, 512, mixed_precision="bf16"),
        "mobilenetv2_224_1x16GB_batch256": advise(measured, 1, 16e9, 256),
        "mobilenetv2_224_1x16GB_batch512": advise(measured, 1, 16e9, 512),
    }
    return {name: {**a.to_dict(), "text": render(a)} for name, a in cases.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    shape, steps, seq_len, batch = (SMALL, 2, 32, 4) if args.quick else (BERT_BASE, 3, 128, 8)
    with tempfile.TemporaryDirectory() as tmp:
        # Quick: the strategies' equality on 2 processes (the tests cover the rest).
        checks = selfcheck.check(Path(tmp) / "selfcheck", four=not args.quick, resume=not args.quick)
        rows = measure_strategies(Path(tmp) / "bert", shape, batch, seq_len, steps)
    by = {(r["strategy"], r["processes"]): r for r in rows}
    single = by[("none", 1)]["state_bytes_max"]
    fsdp_ratio = by[("fsdp", 2)]["state_bytes_max"] / single
    # The advisor's state terms for this model, against what the processes held.
    footprint = ModelFootprint.transformer(shape["layers"], shape["hidden"], shape["heads"], shape["intermediate"],
                                           seq_len=seq_len)
    footprint_params = sum(p.numel() for p in BertClassifier(**shape, seq_len=seq_len).parameters())
    advice = advise(ModelFootprint(**{**footprint.__dict__, "parameters": footprint_params}), devices=2,
                    device_memory=80e9, batch=batch)
    estimated = {e.strategy: e.total - e.terms["activations"] - e.terms.get("gathered", 0)
                 - e.terms.get("gathered_for_evaluation", 0) for e in advice.estimates if not e.checkpointing}
    validation = {s: {"estimated_state_bytes": estimated[s], "measured_state_bytes": by[(label, 2)]["state_bytes_max"],
                      "ratio": by[(label, 2)]["state_bytes_max"] / estimated[s]}
                  for s, label in (("ddp", "ddp"), ("ddp+zero1", "ddp+zero1"), ("fsdp", "fsdp"), ("tp", "tp"),
                                   ("pipeline", "pipeline"))}
    targets = [target(f"equal_to_one_process_{k}_max_abs_diff", checks[k], "<=", tol)
               for k, (_, _, tol) in selfcheck.CHECKS.items() if k in checks]
    if "resume" in checks:
        targets.append(target("resumed_after_kill_vs_uninterrupted_max_abs_diff", checks["resume"], "<=", 1e-6))
    targets += [target("fsdp_2_ranks_state_vs_one_process_tiny_bert", checks["fsdp_state_ratio"], "<=", 0.55, "x"),
                target("fsdp_2_ranks_state_vs_one_process_bert_base", fsdp_ratio, "<=", 0.55, "x")]
    body = {"quick": args.quick, "model": {**shape, "parameters": footprint_params, "seq_len": seq_len,
                                           "global_batch": batch, "optimizer": "adamw"},
            "equality": checks, "strategies": rows, "advisor_state_validation": validation,
            "advisor_on_paper": on_paper()}
    write_result(NAME, torch.get_num_threads(), "cpu", body, targets, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
