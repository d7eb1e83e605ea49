"""Han, Mao and Dally (ICLR 2016), "Deep Compression", on Fashion-MNIST.

The paper's three stages on its two MNIST nets, LeNet-300-100 and (Caffe's) LeNet-5:

1. pruning to the paper's per-layer rates, gradually (Zhu & Gupta's schedule) while
   training, then retraining with the masks held;
2. trained quantization: k-means weight sharing with linear initialisation, a few bits
   per layer, then fine-tuning of the centroids;
3. Huffman coding of the cluster codes and relative indices, by slimkit's codec.

The dense baselines are trained here, on 55,000 images of Fashion-MNIST's train split,
with early stopping on the other 5,000 (carved with seed 0); every retraining stops
early on the same validation split. Errors are counted on the full 10,000-image test
split. The compression ratio is 4 bytes x (weights + biases) of the dense net divided by
the bytes of the compressed file on disk (header, codebooks, Huffman tables, indices,
biases and checksums included), and the test error in the last row is that of a fresh
net loaded from the decoded file.

The pruned and clustered nets learn, by default, from the dense net as well as from the
labels (--recovery distill: soft targets at T = 4 plus the labels at weight 0.5, on the
same train split), which is slimkit's recovery path; --recovery hard trains them on the
labels alone, as the paper did. Each recovery keeps its stages apart under --work.

How many bits each layer gets is chosen on the validation split: starting from 8 bits
everywhere, the layer whose next bit costs the least validation loss per byte saved
(one-shot clustering, before fine-tuning) loses it, until the file fits the paper's
ratio with a 2% margin. The pruning rates are the paper's, not tuned.

Rows 2 and 3 of the table are sized by counting, as the paper's P and P+Q columns are:
each kept weight as a 32-bit value (pruned) or a fixed-width cluster code (quantized),
plus a fixed-width relative index of the best width (the codec's, without Huffman), plus
codebooks and 32-bit biases. Row 4 is the real file.

Each trained stage is kept under --work, so an interrupted run continues where it stopped.
A full run trains for at most 94 LeNet-300-100 epochs and 46 LeNet-5 epochs (early
stopping ends most stages sooner): some 20 to 30 minutes on two cores.

    python benchmarks/deep_compression.py          # full run -> benchmarks/results/deep_compression.json
    python benchmarks/deep_compression.py --net lenet5   # one net only; prints its results
    python benchmarks/deep_compression.py --quick --out /tmp/q.json   # smoke run of the same code
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import target, work_folder, write_result  # noqa: E402

from slimkit.atomic import write_json, write_with  # noqa: E402
from slimkit.compress import ClusterConfig, cluster_, decode, describe, encode  # noqa: E402
from slimkit.compress.cluster import shared_weights  # noqa: E402
from slimkit.config import LayerSelector  # noqa: E402
from slimkit.distill import DistillConfig, DistillData, EarlyStopping, LossTerm, distill  # noqa: E402
from slimkit.prune import GradualPruner, GradualSchedule, MagnitudePruneConfig, make_permanent_  # noqa: E402
from slimkit.zoo.images import load_fashion_mnist  # noqa: E402
from slimkit.zoo.lenet import LeNet5, lenet_300_100  # noqa: E402

VAL_SIZE = 5000
MAX_DROP = 0.5  # test accuracy points lost against the dense net, at most
MARGIN = 0.02  # the file must beat the paper's ratio by this much when the bits are chosen
BITS = range(2, 9)  # per-layer choices; 8 bits is the paper's most (its conv layers)
MAX_GAP_BITS = 12  # widths of the relative index tried for the fixed-width sizes
ADAMW = {"batch_size": 128, "optimizer": "adamw"}
# How pruning, retraining and centroid fine-tuning learn. "hard": the paper's, on the
# labels. "distill": from the dense net as well (soft targets at T, plus the labels at
# HARD_WEIGHT), on the same train split: slimkit's recovery path. Chosen with --recovery.
RECOVERY = {"hard": [LossTerm(kind="hard_ce")],
            "distill": [LossTerm(kind="soft_kl", temperature=4.0, weight=1.0), LossTerm(kind="hard_ce", weight=0.5)]}


def stop(patience: int) -> dict:
    return {"metric": "val_accuracy", "mode": "max", "patience": patience}


# keep: the paper's fraction of weights kept per layer (its Tables 1 and 2; ip1/ip2/ip3
# are net.2/net.5/net.8). prune: epochs of gradual pruning, the final sparsity reached
# after the fraction `ramp` of them; retrain: with the masks held; finetune: the centroids (and
# biases). A LeNet-5 epoch costs seven to eight times a LeNet-300-100 one (about 30 s of
# CPU against 4 s on one thread, measured in quick mode), hence its smaller budgets: at
# most 46 epochs, and early stopping ends most stages sooner.
NETS = {
    "lenet_300_100": {
        "build": lenet_300_100, "paper_ratio": 40.0, "accuracy_floor": 89.0,
        "keep": {"net.2": 0.08, "net.5": 0.09, "net.8": 0.26},
        "dense": {**ADAMW, "epochs": 40, "lr": 1e-3, "schedule": "cosine", "early_stopping": stop(8)},
        # Pruned over 4 epochs, it kept 90.2% on validation after retraining; over 12 (its
        # epochs cost 3 s), 90.5%, about what the dense net reached.
        "prune": {**ADAMW, "epochs": 18, "lr": 1e-3, "schedule": "constant", "ramp": 2 / 3},
        "retrain": {**ADAMW, "epochs": 30, "lr": 5e-4, "schedule": "cosine", "early_stopping": stop(8)},
        "finetune": {**ADAMW, "epochs": 6, "lr": 1e-4, "schedule": "cosine", "early_stopping": stop(3)},
    },
    "lenet5": {
        "build": LeNet5, "paper_ratio": 39.0, "accuracy_floor": 90.0,
        "keep": {"conv1": 0.66, "conv2": 0.12, "fc1": 0.08, "fc2": 0.19},
        "dense": {**ADAMW, "epochs": 20, "lr": 1e-3, "schedule": "cosine", "early_stopping": stop(4)},
        # Validation accuracy was still rising when three epochs of gradual pruning ended
        # (87.0, 90.9, 91.4%), and the retraining's best came late: both get more time.
        "prune": {**ADAMW, "epochs": 6, "lr": 1e-3, "schedule": "constant", "ramp": 2 / 3},
        "retrain": {**ADAMW, "epochs": 12, "lr": 5e-4, "schedule": "cosine", "early_stopping": stop(4)},
        # Clustering to these bits cost 0.3 points of validation accuracy, which three
        # epochs of centroid fine-tuning did not win back (validation still rising).
        "finetune": {**ADAMW, "epochs": 8, "lr": 1e-4, "schedule": "cosine", "early_stopping": stop(3)},
    },
}
QUICK = {"train": 3000, "val": 500, "epochs": {"dense": 2, "prune": 2, "retrain": 1, "finetune": 1}}
STAGES = ["dense", "pruned", "pruned+quantized", "pruned+quantized+Huffman"]


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 2000) -> dict[str, float]:
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)])
    return {"accuracy": float((logits.argmax(1) == y).float().mean()),
            "loss": float(nn.functional.cross_entropy(logits, y))}


def train(folder: Path, model: nn.Module, data: DistillData, budget: dict, val, test, on_step=None,
          teacher: nn.Module | None = None, before: tuple[dict, ...] = ()) -> dict:
    """Train ``model`` (or load it if this stage finished before); return its record.

    With ``teacher``, it learns the teacher's soft targets as well as the labels
    (``RECOVERY["distill"]``); without, the labels alone. ``before``: the budgets of the
    stages this one starts from. A kept stage trained under other budgets (this one's or
    an earlier stage's) is refused rather than reused."""
    done = folder / "result.json"
    budgets = [*before, budget]
    if done.exists():
        record = json.loads(done.read_text())
        if record.get("budgets") != budgets:
            sys.exit(f"{folder} was trained with other budgets than this script's: delete it and what was "
                     "trained after it (later stages, bits.json), or give another --work folder")
        model.load_state_dict(load_file(str(folder / "model.safetensors")))
        model.eval()
        return {k: v for k, v in record.items() if k != "budgets"}
    settings = {k: v for k, v in budget.items() if k != "ramp"}
    es = settings.pop("early_stopping", None)
    losses = RECOVERY["distill" if teacher is not None else "hard"]
    cfg = DistillConfig(losses=losses, seed=0, early_stopping=EarlyStopping(**es) if es else None,
                        cache_teacher=teacher is not None, **settings)
    cpu = time.process_time()
    result = distill(teacher, model, data, cfg, checkpoint_dir=folder / "checkpoint", device="cpu",
                     evaluate=lambda m: {f"val_{k}": v for k, v in evaluate(m, *val).items()},
                     progress=sys.stderr.isatty(), on_step=on_step)
    cpu = time.process_time() - cpu  # of this attempt only, if it resumed; on a busy machine, closer than wall time
    epochs = result.steps / math.ceil(len(data) / cfg.batch_size)
    record = {"test_accuracy": evaluate(model, *test)["accuracy"], "val_accuracy": evaluate(model, *val)["accuracy"],
              "best_val_accuracy": result.best["value"] if result.best else None, "steps": result.steps,
              "epochs_run": round(epochs, 3), "stopped_early": result.stopped_early,
              "train_seconds": result.seconds, "seconds_per_epoch": result.seconds / epochs,
              "cpu_seconds": cpu, "cpu_seconds_per_epoch": cpu / epochs,
              "val_curve": [[e["step"], e["val_accuracy"]] for e in result.evals]}
    write_with(folder / "model.safetensors", lambda p: save_file(dict(model.state_dict()), str(p)))
    write_json(done, {**record, "budgets": budgets})
    return record


def gradual_pruners(model: nn.Module, keep: dict[str, float], end_step: int, every: int) -> list[GradualPruner]:
    """One pruner per layer, each ramping to its own rate; creating them masks the layers (nothing pruned yet)."""
    return [GradualPruner(model, MagnitudePruneConfig(
        schedule=GradualSchedule(final=1.0 - k, end_step=end_step, every=every),
        layers=LayerSelector(targets=[name]))) for name, k in keep.items()]


def fixed_width_bits(flat_codes: np.ndarray, value_bits: int) -> tuple[int, int, int]:
    """(bits, index width, entries) of the non-zero entries of ``flat_codes`` stored as
    fixed-width relative indices (the codec's, fillers included) and ``value_bits`` each."""
    gaps = np.diff(np.flatnonzero(flat_codes), prepend=-1) - 1
    best = None
    for g in range(1, MAX_GAP_BITS + 1):
        entries = len(gaps) + int((gaps >> g).sum())
        cost = (entries * (g + value_bits), g, entries)
        best = cost if best is None or cost < best else best
    return best


def counted_size(model: nn.Module, layers: list[str]) -> dict:
    """Bytes of ``model`` stored without Huffman coding: ``layers`` as relative indices plus
    32-bit values, or plus cluster codes and a 32-bit codebook when they are clustered;
    every other tensor (the biases) as 32-bit values."""
    total, value_bits, index_bits, kept = 0, 0, 0, 0
    for key, t in model.state_dict().items():
        if not any(key == f"{n}.weight" or key.startswith(f"{n}.parametrizations.") for n in layers):
            total += 4 * t.numel()
    for name in layers:
        module = model.get_submodule(name)
        shared = shared_weights(module)
        if shared is None:
            codes, bits, codebook = (module.weight.detach() != 0).reshape(-1).numpy(), 32, 0
        else:
            codes, bits = shared.codes.reshape(-1).numpy(), int(math.log2(len(shared.codebook)))
            codebook = 32 * len(shared.codebook)
        stored, width, entries = fixed_width_bits(codes, bits)
        total += (stored + codebook + 7) // 8
        value_bits += entries * bits
        index_bits += entries * width
        kept += int(np.count_nonzero(codes))
    return {"bytes": total, "bits_per_weight": value_bits / kept, "index_bits_per_weight": index_bits / kept}


def choose_bits(pruned: nn.Module, layers: list[str], budget_bytes: float, val, scratch: Path) -> dict:
    """Bits per layer, chosen on the validation split: from 8 bits everywhere, take a bit from
    the layer that loses the least validation loss per byte saved (one-shot clustering, no
    fine-tuning), until the file fits ``budget_bytes``.

    Sizes are those of real files: each bit width is clustered and encoded once for all
    layers, and a plan's size is the sum of its layers' stored bytes plus the rest (biases,
    header, checksums) of the file.
    """
    shared, stored, rest = {}, {}, {}
    for b in BITS:
        m = copy.deepcopy(pruned)
        cluster_(m, ClusterConfig(bits=b, layers=LayerSelector(targets=layers)))
        path = scratch / f"bits{b}.skwc"
        size = encode(m, path)
        per_tensor = {t["name"]: t["bytes"] for t in describe(path)["tensors"]}
        path.unlink()
        for name in layers:
            shared[name, b] = m.get_submodule(name).weight.detach().clone()
            stored[name, b] = per_tensor[f"{name}.weight"]
        rest[b] = size - sum(per_tensor[f"{n}.weight"] for n in layers)
    base = dict(pruned.state_dict())
    probe = copy.deepcopy(pruned)
    losses: dict[tuple[int, ...], dict[str, float]] = {}

    def val_metrics(plan: tuple[int, ...]) -> dict[str, float]:
        if plan not in losses:
            probe.load_state_dict({**base, **{f"{n}.weight": shared[n, b] for n, b in zip(layers, plan, strict=True)}})
            losses[plan] = evaluate(probe, *val)
        return losses[plan]

    def size(plan: tuple[int, ...]) -> int:
        return max(rest.values()) + sum(stored[n, b] for n, b in zip(layers, plan, strict=True))

    plan = (max(BITS),) * len(layers)
    trace = [{"bits": list(plan), "bytes": size(plan), **{f"val_{k}": v for k, v in val_metrics(plan).items()}}]
    while size(plan) > budget_bytes:
        options = []
        for i, b in enumerate(plan):
            if b == min(BITS):
                continue
            candidate = plan[:i] + (b - 1,) + plan[i + 1:]
            saved = size(plan) - size(candidate)
            if saved > 0:
                cost = val_metrics(candidate)["loss"] - val_metrics(plan)["loss"]
                options.append((cost / saved, i, candidate))
        if not options:
            break  # every layer at the fewest bits: the file cannot fit; the target reports it
        plan = min(options)[2]
        trace.append({"bits": list(plan), "bytes": size(plan), **{f"val_{k}": v for k, v in val_metrics(plan).items()}})
    return {"bits": dict(zip(layers, plan, strict=True)), "budget_bytes": budget_bytes, "estimated_bytes": size(plan),
            "trace": trace}


def compress_net(name: str, spec: dict, work: Path, data: DistillData, val, test, quick: bool,
                 recovery: str = "distill") -> dict:
    """All stages of one net; each is kept under ``work/name`` and loaded if it finished before
    (the stages after the dense net under ``work/name/recovery-RECOVERY``)."""
    folder = work / name
    keep = spec["keep"]
    layers = list(keep)
    budgets = {stage: dict(spec[stage], epochs=QUICK["epochs"][stage]) if quick else spec[stage]
               for stage in ("dense", "prune", "retrain", "finetune")}
    steps_per_epoch = math.ceil(len(data) / budgets["prune"]["batch_size"])
    started = time.time()

    torch.manual_seed(0)
    model = spec["build"]()
    params = sum(p.numel() for p in model.parameters())
    weights = {n: model.get_submodule(n).weight.numel() for n in layers}
    dense_bytes = 4 * params
    dense = train(folder / "dense", model, data, budgets["dense"], val, test)
    print(f"{name} dense: test accuracy {100 * dense['test_accuracy']:.2f}%, "
          f"{dense['seconds_per_epoch']:.1f} s per epoch", file=sys.stderr)
    teacher = copy.deepcopy(model).eval() if recovery == "distill" else None
    folder = folder / f"recovery-{recovery}"

    # Prune gradually while training (masks updated about four times an epoch), then
    # retrain with the masks held; early stopping only in the second run, so that the
    # weights it keeps are always at the final sparsity.
    end_step = max(1, int(budgets["prune"]["ramp"] * budgets["prune"]["epochs"] * steps_per_epoch))
    pruners = gradual_pruners(model, keep, end_step, every=max(1, steps_per_epoch // 4))

    def prune_step(step: int, m: nn.Module) -> None:
        for pruner in pruners:
            pruner(step, m)

    chain = [budgets[s] for s in ("dense", "prune", "retrain")]
    prune_rec = train(folder / "prune", model, data, budgets["prune"], val, test, on_step=prune_step, teacher=teacher,
                      before=tuple(chain[:1]))
    retrain = train(folder / "retrain", model, data, budgets["retrain"], val, test, teacher=teacher,
                    before=tuple(chain[:2]))
    make_permanent_(model)
    kept = {n: int((model.get_submodule(n).weight != 0).sum()) for n in layers}
    pruned_size = counted_size(model, layers)

    plan_file = folder / "bits.json"
    if plan_file.exists():
        plan = json.loads(plan_file.read_text())
    else:
        folder.mkdir(parents=True, exist_ok=True)
        t0 = time.process_time()
        with tempfile.TemporaryDirectory(dir=folder) as scratch:
            plan = choose_bits(model, layers, dense_bytes / (spec["paper_ratio"] * (1 + MARGIN)), val, Path(scratch))
        plan["cpu_seconds"] = time.process_time() - t0
        write_json(plan_file, plan)
    cluster_(model, ClusterConfig(layer_bits=plan["bits"], layers=LayerSelector(targets=layers)))
    oneshot_val = evaluate(model, *val)["accuracy"]
    finetune = train(folder / "finetune", model, data, budgets["finetune"], val, test, teacher=teacher,
                     before=(*chain, plan["bits"]))
    quantized_size = counted_size(model, layers)

    path = folder / f"{name}.skwc"
    encode(model, path)
    file_bytes = os.path.getsize(path)
    decoded = spec["build"]()
    decoded.load_state_dict(decode(path))
    decoded_test = evaluate(decoded, *test)["accuracy"]
    with torch.no_grad():
        model.eval()
        same = bool(torch.equal(decoded(test[0][:2000]), model(test[0][:2000])))

    # Where the file's bytes go, per layer: the paper's Tables 1 and 2.
    described = {t["name"]: t for t in describe(path)["tensors"]}
    layer_rows = []
    for n in layers:
        t = described[f"{n}.weight"]
        sec = t["sections"]
        layer_rows.append({
            "layer": n, "weights": weights[n], "kept_percent": 100 * kept[n] / weights[n], "bits": plan["bits"][n],
            "kind": t["kind"], "code_bits_per_weight": 8 * sec.get("codes", 0) / kept[n],
            "index_bits_per_weight": 8 * sec.get("gaps", 0) / kept[n], "bytes": t["bytes"]})
    total_weights, total_kept = sum(weights.values()), sum(kept.values())
    huffman_bits = sum(8 * described[f"{n}.weight"]["sections"].get("codes", 0) for n in layers) / total_kept
    huffman_index = sum(8 * described[f"{n}.weight"]["sections"].get("gaps", 0) for n in layers) / total_kept
    kept_pct = 100 * total_kept / total_weights

    def row(stage, kept_percent, bits, index_bits, size, accuracy):
        return [name, stage, kept_percent, bits, index_bits, size, dense_bytes / size, 100 * (1 - accuracy)]

    rows = [row(STAGES[0], 100.0, 32.0, 0.0, dense_bytes, dense["test_accuracy"]),
            row(STAGES[1], kept_pct, pruned_size["bits_per_weight"], pruned_size["index_bits_per_weight"],
                pruned_size["bytes"], retrain["test_accuracy"]),
            row(STAGES[2], kept_pct, quantized_size["bits_per_weight"], quantized_size["index_bits_per_weight"],
                quantized_size["bytes"], finetune["test_accuracy"]),
            row(STAGES[3], kept_pct, huffman_bits, huffman_index, file_bytes, decoded_test)]
    full_epoch = {stage: rec["cpu_seconds_per_epoch"] * (55_000 / len(data))
                  for stage, rec in (("dense", dense), ("prune", prune_rec), ("retrain", retrain), ("finetune", finetune))}
    return {
        "params": params, "dense_bytes": dense_bytes, "keep": keep, "kept": kept, "weights": weights,
        "bits": plan["bits"], "bit_choice": plan, "budgets": budgets,
        "dense": dense, "prune": prune_rec, "retrain": retrain, "finetune": finetune,
        "oneshot_quantized_val_accuracy": oneshot_val, "decoded_test_accuracy": decoded_test,
        "decoded_outputs_identical": same, "file_bytes": file_bytes, "ratio": dense_bytes / file_bytes,
        "accuracy_drop_points": 100 * (dense["test_accuracy"] - decoded_test),
        "file": {k: v for k, v in describe(path).items() if k != "tensors"},
        "layers": layer_rows, "rows": rows,
        "cpu_seconds_per_full_epoch": full_epoch, "seconds_this_run": time.time() - started,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small train subset, an epoch or two per stage")
    p.add_argument("--out", type=Path, help="result file (default benchmarks/results/deep_compression.json)")
    p.add_argument("--work", type=Path, help="where trained stages are kept for resuming (default .bench-work/deep_compression)")
    p.add_argument("--net", choices=["all", *NETS], default="all",
                   help="compress one net only and print its results (no result file)")
    p.add_argument("--recovery", choices=sorted(RECOVERY), default="distill",
                   help="how the pruned and clustered nets learn: from the labels (the paper's 'hard') or also "
                        "from the dense net's soft targets ('distill')")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if args.quick and args.out is None:
        p.error("--quick results are not benchmark results: give --out PATH")
    work = work_folder("deep_compression", args.quick, args.work)
    torch.set_num_threads(args.threads)

    data = load_fashion_mnist()
    train_part, (val_x, val_y) = data.validation_split(QUICK["val"] if args.quick else VAL_SIZE, seed=0)
    tx, ty = train_part.train_x, train_part.train_y
    if args.quick:
        tx, ty = tx[:QUICK["train"]], ty[:QUICK["train"]]
    # [N, 28, 28] images: the MLP flattens them, LeNet-5 adds the channel.
    train_data = DistillData({"x": torch.from_numpy(tx)}, torch.from_numpy(ty))
    val = (torch.from_numpy(val_x), torch.from_numpy(val_y))
    test = (torch.from_numpy(data.test_x), torch.from_numpy(data.test_y))

    names = list(NETS) if args.net == "all" else [args.net]
    results = {n: compress_net(n, NETS[n], work, train_data, val, test, args.quick, args.recovery) for n in names}
    if args.net != "all":
        r = results[args.net]
        print(json.dumps({"rows": r["rows"], "bits": r["bits"], "ratio": r["ratio"],
                          "accuracy_drop_points": r["accuracy_drop_points"]}, indent=1))
        return 0

    table = {"columns": ["net", "stage", "weights kept %", "bits per weight", "index bits per weight", "bytes",
                         "compression ratio", "test error %"],
             "rows": [row for n in names for row in results[n]["rows"]],
             "note": "bytes of rows 2-3 counted (fixed-width codes and indices, 32-bit biases); row 4 is the "
                     "file on disk; test error of row 4 is the decoded file's"}
    body = {"quick": args.quick, "dataset": "fashion-mnist", "train_size": len(ty), "val_size": len(val_y),
            "test_size": len(data.test_y), "margin": MARGIN, "recovery": args.recovery,
            "recovery_losses": [t.model_dump() for t in RECOVERY[args.recovery]], "table": table, "nets": results}
    targets = (
        [target(f"{n}_dense_test_accuracy", 100 * results[n]["dense"]["test_accuracy"], ">=",
                NETS[n]["accuracy_floor"], "%") for n in names]
        + [target(f"{n}_compression_ratio", results[n]["ratio"], ">=", NETS[n]["paper_ratio"], "x") for n in names]
        + [target(f"{n}_accuracy_drop", results[n]["accuracy_drop_points"], "<=", MAX_DROP, "points") for n in names])
    path = write_result("deep_compression", args.threads, "cpu", body, targets, args.out)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
