"""Activation checkpointing to a budget on a BERT-base-sized model, fp32 and bf16 autocast.

A randomly initialised BertForSequenceClassification (12 layers, hidden 768, 12 heads,
intermediate 3072, dropout on) trains one step at batch 8, sequence 128. slimkit profiles
it, reports the least and the most peak activation memory checkpointing can reach, and
plans three budgets between the two. Every variant (no checkpointing, every layer, the
three budgets, and bf16 autocast without and with every layer) is measured by the same
harness in one process: the activation peak of a step (live tensor storages on CPU, the
CUDA allocator's peak on a GPU), step time as medians over interleaved rounds after
warm-up, and for every-layer checkpointing the gradients against no checkpointing.

    python benchmarks/memory_checkpoint.py          # full run, writes benchmarks/results/memory_checkpoint.json
    python benchmarks/memory_checkpoint.py --quick --out PATH   # a 2-layer smoke run of the same code (CI)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import target, write_result  # noqa: E402

from slimkit.measure.latency import measure_latency  # noqa: E402
from slimkit.memory.checkpoint import (  # noqa: E402
    CheckpointConfig,
    checkpoint_,
    plan_checkpointing,
    profile_checkpointing,
)
from slimkit.memory.peak import measure_activation_peak  # noqa: E402

FULL = {"layers": 12, "hidden": 768, "heads": 12, "intermediate": 3072, "vocab": 30522, "batch": 8,
        "seq_len": 128, "rounds": 11, "repeats": 3}
# A small vocabulary: with BERT's 30522 words the dense gradient of a 64-wide embedding
# table would be the largest tensor of the step and hide what the blocks do.
QUICK = {"layers": 2, "hidden": 64, "heads": 2, "intermediate": 128, "vocab": 1000, "batch": 2, "seq_len": 32,
         "rounds": 2, "repeats": 1}
BUDGET_FRACTIONS = (0.25, 0.5, 0.75)  # of the way from the least reachable peak to the most
GRAD_REL_TOL = 1e-5
SEED = 0


def build(size: dict, device: torch.device):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(SEED)
    cfg = BertConfig(num_hidden_layers=size["layers"], hidden_size=size["hidden"],
                     num_attention_heads=size["heads"], intermediate_size=size["intermediate"],
                     vocab_size=size["vocab"], num_labels=2)
    model = BertForSequenceClassification(cfg).to(device).train()
    g = torch.Generator().manual_seed(SEED + 1)
    b, s = size["batch"], size["seq_len"]
    batch = {"input_ids": torch.randint(0, cfg.vocab_size, (b, s), generator=g),
             "attention_mask": torch.ones(b, s, dtype=torch.long),
             "labels": torch.randint(0, 2, (b,), generator=g)}
    return model, {k: v.to(device) for k, v in batch.items()}, cfg


def loss_fn(out) -> torch.Tensor:
    return out.loss


def gradients(model, batch, config: CheckpointConfig) -> dict[str, torch.Tensor]:
    """The gradients of one step under ``config``, from the same RNG state each time."""
    handle = checkpoint_(model, config)
    model.zero_grad(set_to_none=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED + 2)  # the same dropout masks with and without checkpointing
        loss_fn(model(**batch)).backward()
    handle.remove()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def compare(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> dict:
    assert ref.keys() == got.keys()
    max_abs = max(float((got[n].float() - ref[n].float()).abs().max()) for n in ref)
    scale = max(float(ref[n].float().abs().max()) for n in ref)
    try:
        for n in ref:
            torch.testing.assert_close(got[n], ref[n])
        close = True
    except AssertionError:
        close = False
    return {"max_abs_diff": max_abs, "max_abs_grad": scale, "max_rel_diff": max_abs / scale,
            "assert_close": close, "tensors": len(ref)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a 2-layer small BERT at batch 2, sequence 32")
    p.add_argument("--out", type=Path, help="result file (default benchmarks/results/memory_checkpoint.json; "
                                            "--quick needs it)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, help="timing rounds (default 11, quick 2)")
    args = p.parse_args()
    if args.quick and args.out is None:
        p.error("--quick results are not benchmark results: give --out PATH")
    size = dict(QUICK if args.quick else FULL)
    if args.rounds:
        size["rounds"] = args.rounds
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = time.perf_counter()
    model, batch, cfg = build(size, device)

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {msg}", file=sys.stderr, flush=True)

    # -- plan --------------------------------------------------------------------------
    profile = profile_checkpointing(model, batch, loss_fn, CheckpointConfig(repeats=size["repeats"]))
    log(f"profiled: peak {profile.min_peak_bytes / 2**20:.1f} to {profile.max_peak_bytes / 2**20:.1f} MiB")
    every = profile.names
    variants: dict[str, dict] = {
        "none": {"config": CheckpointConfig(blocks=[]), "budget_bytes": None},
        "every_layer": {"config": CheckpointConfig(blocks=every), "budget_bytes": None},
        # Every layer again, keeping the FFN down projections' outputs (selective
        # recomputation): on a CPU a backward costs only ~1.4x its forward, so recomputing
        # whole layers costs ~1.4x the step; skipping the widest matmuls buys most of it back.
        "every_layer_selective": {"config": CheckpointConfig(blocks=every, policy="selective"), "budget_bytes": None},
    }
    span = profile.max_peak_bytes - profile.min_peak_bytes
    for f in BUDGET_FRACTIONS:
        budget = int(profile.min_peak_bytes + f * span)
        plan = plan_checkpointing(model, batch, loss_fn, budget, profile=profile)
        variants[f"budget_{round(f * 100)}pct"] = {
            "config": CheckpointConfig(blocks=plan.chosen), "budget_bytes": budget, "plan": plan}
        log(plan.summary())
    variants["bf16_none"] = {"config": CheckpointConfig(blocks=[], autocast="bf16"), "budget_bytes": None}
    variants["bf16_every_layer"] = {"config": CheckpointConfig(blocks=every, autocast="bf16"), "budget_bytes": None}

    # -- peaks -------------------------------------------------------------------------
    params = [q for q in model.parameters() if q.requires_grad]

    def step() -> None:
        loss_fn(model(**batch)).backward()

    for name, v in variants.items():
        handle = checkpoint_(model, v["config"])
        with torch.random.fork_rng(devices=[]):
            v["peak"] = measure_activation_peak(step, params, device)
        handle.remove()
        log(f"{name}: peak {v['peak'].peak_bytes / 2**20:.1f} MiB")

    # -- gradients ---------------------------------------------------------------------
    ref = gradients(model, batch, variants["none"]["config"])
    grads = {"every_layer_vs_none": compare(ref, gradients(model, batch, variants["every_layer"]["config"])),
             "every_layer_selective_vs_none": compare(
                 ref, gradients(model, batch, variants["every_layer_selective"]["config"]))}
    ref16 = gradients(model, batch, variants["bf16_none"]["config"])
    grads["bf16_every_layer_vs_bf16_none"] = compare(
        ref16, gradients(model, batch, variants["bf16_every_layer"]["config"]))
    del ref, ref16
    log(f"gradients: {grads}")

    # -- step time ---------------------------------------------------------------------
    def timed(config: CheckpointConfig):
        def call() -> None:
            handle = checkpoint_(model, config)
            model.zero_grad(set_to_none=True)
            step()
            handle.remove()
        return call

    # The model is warm from profiling, and the harness makes one untimed call before each
    # variant's turn in every round; a step of BERT-base takes seconds, so no more warm-up.
    harness = {"rounds": size["rounds"], "iters": 1, "warmup": 0}
    lat = measure_latency({n: timed(v["config"]) for n, v in variants.items()}, "none", size["batch"],
                          progress=lambda: log("timing round done"), **harness)
    model.zero_grad(set_to_none=True)

    # -- report ------------------------------------------------------------------------
    none_peak = variants["none"]["peak"].peak_bytes
    out_variants = []
    for name, v in variants.items():
        blocks = list(v["config"].blocks.targets) if not isinstance(v["config"].blocks, str) else every
        # Predictions are for fp32 and full recomputation, what the profile measured.
        full = v["config"].autocast == "none" and v["config"].policy == "full"
        plan = v.get("plan")
        out_variants.append({
            "name": name, "autocast": v["config"].autocast, "policy": v["config"].policy,
            "checkpointed": len(blocks), "blocks": blocks,
            "budget_bytes": v["budget_bytes"],
            "predicted_peak_bytes": profile.predict_peak(blocks) if full else None,
            "measured_peak_bytes": v["peak"].peak_bytes,
            "peak_ratio_to_none": v["peak"].peak_bytes / none_peak,
            "predicted_time_ratio": ((profile.step_seconds + profile.predict_extra_seconds(blocks))
                                     / profile.step_seconds) if full else None,
            "plan_checks": plan.checks if plan is not None else None,
            "step": {k: lat[name][k] for k in ("median_ms", "p10_ms", "p90_ms", "ratio_to_baseline")},
        })
    by_name = {v["name"]: v for v in out_variants}
    # The targets are met (or not) by one variant: every layer checkpointed, selectively.
    # Full recomputation of every layer is reported beside it (variants: every_layer).
    every_sel = by_name["every_layer_selective"]
    targets = [
        target("peak_activation_ratio_every_layer_selective", every_sel["peak_ratio_to_none"], "<=", 0.3, "x"),
        target("step_time_ratio_every_layer_selective", every_sel["step"]["ratio_to_baseline"], "<=", 1.4, "x"),
        *[target(f"budget_within_{round(f * 100)}pct",
                 by_name[f"budget_{round(f * 100)}pct"]["measured_peak_bytes"]
                 / by_name[f"budget_{round(f * 100)}pct"]["budget_bytes"], "<=", 1.0, "x")
          for f in BUDGET_FRACTIONS],
        target("gradient_max_rel_diff_every_layer_selective", grads["every_layer_selective_vs_none"]["max_rel_diff"],
               "<=", GRAD_REL_TOL),
    ]
    body = {
        "quick": args.quick,
        "device": str(device),
        "model": {"kind": "BertForSequenceClassification (random init)", "layers": size["layers"],
                  "hidden": size["hidden"], "heads": size["heads"], "intermediate": size["intermediate"],
                  "vocab": size["vocab"],
                  "params": sum(q.numel() for q in model.parameters()), "dropout": cfg.hidden_dropout_prob,
                  "seed": SEED},
        "batch": size["batch"], "seq_len": size["seq_len"],
        "loss": "cross-entropy of the classification head (out.loss)",
        "peak_method": variants["none"]["peak"].method,
        "harness": {**harness, "device": str(device)},
        "reachable": {"min_peak_bytes": profile.min_peak_bytes, "min_blocks": len(profile.min_blocks),
                      "max_peak_bytes": profile.max_peak_bytes,
                      "predicted_min_peak_bytes": profile.predict_peak(profile.min_blocks)},
        "profile": profile.to_dict(),
        "variants": out_variants,
        "gradients": grads,
        "wall_seconds": time.perf_counter() - started,
    }
    path = write_result("memory_checkpoint", args.threads, str(device), body, targets, args.out)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
