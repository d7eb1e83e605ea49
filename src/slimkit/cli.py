"""The ``slimkit`` command: ``run`` and ``validate`` a recipe, ``profile`` its model's memory,
and ``bundle`` a model for devices (keys, signed bundles, verifying and installing them)."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TYPE_CHECKING

from slimkit.errors import ConfigError, SlimkitError

if TYPE_CHECKING:
    from slimkit.recipe import Recipe
    from slimkit.zoo.models import LoadedModel


# torchao, which transformers imports when it is installed, logs at import about optional
# CUDA kernels this build lacks and about its pytree registrations; neither concerns a run.
QUIET_LOGGERS = ("torchao", "torch.utils._pytree")


def main(argv: list[str] | None = None) -> int:
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    parser = argparse.ArgumentParser(prog="slimkit", description="Make models fit, and measure what it cost.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run a recipe and write a run folder")
    p_run.add_argument("recipe")
    p_run.add_argument("overrides", nargs="*", help="key.path=value, e.g. measure.rounds=3")
    p_run.add_argument("--output", "-o", help="run folder (default: the recipe's output, or runs/NAME)")
    p_run.add_argument("--no-progress", action="store_true")
    p_val = sub.add_parser("validate", help="check a recipe without running it")
    p_val.add_argument("recipe")
    p_val.add_argument("overrides", nargs="*")
    p_prof = sub.add_parser("profile", help="profile the live-tensor memory of the recipe's model "
                            "(one forward pass at batch 1, or a training step with --train)")
    p_prof.add_argument("recipe")
    p_prof.add_argument("overrides", nargs="*", help="key.path=value, e.g. measure.seq_len=64")
    p_prof.add_argument("--train", action="store_true",
                        help="profile a training step (forward, loss, backward, AdamW step)")
    p_prof.add_argument("--json", metavar="OUT", help="also write the whole profile, timeline included, as JSON")
    p_prof.add_argument("--top", type=int, default=10, help="largest live tensors to list (default 10)")
    p_prof.add_argument("--snapshot", metavar="PATH",
                        help="on CUDA, write the allocator's snapshot for PyTorch's memory viewer")
    p_prof.add_argument("--devices", type=int, metavar="N",
                        help="with --train: estimate each parallel strategy's memory on N devices and recommend one")
    p_prof.add_argument("--device-memory", metavar="SIZE", help="memory of one device, e.g. 80GiB (with --devices)")
    p_prof.add_argument("--batch", type=int, metavar="B",
                        help="global batch for the estimates (default: the first training stage's batch_size x grad_accum)")
    p_exp = sub.add_parser("export", help="export a model (or a run's) to ONNX at a precision, checked against PyTorch")
    p_exp.add_argument("source", help="a run folder, a saved model folder, or a recipe's model: source")
    p_exp.add_argument("--format", choices=["onnx"], default="onnx")
    p_exp.add_argument("--precision", default="fp32", help="fp32, fp16, int8-dynamic or int8-static")
    p_exp.add_argument("--output", "-o", required=True, help="the folder to write")
    p_exp.add_argument("--recipe", help="a recipe whose task gives the inputs and calibration data")
    p_exp.add_argument("--calibration-samples", type=int, default=128)
    p_ben = sub.add_parser("bench", help="measure a model, or a run's variants, across backends, threads and batches")
    p_ben.add_argument("source", help="a run folder, a saved model folder, or a recipe's model: source")
    p_ben.add_argument("--backends", default="torch,ort",
                       help="any of torch (eager), compiled (torch.compile) and ort (default torch,ort)")
    p_ben.add_argument("--threads", default="1,2", help="thread counts, e.g. 1,2,4")
    p_ben.add_argument("--batch-sizes", default="1,8", help="batch sizes, e.g. 1,8")
    p_ben.add_argument("--recipe", help="a recipe whose task gives the inputs")
    p_ben.add_argument("--rounds", type=int, default=5)
    p_ben.add_argument("--json", metavar="OUT", help="also write the rows as JSON")
    p_bun = sub.add_parser("bundle", help="signed, versioned model bundles for devices")
    bun = p_bun.add_subparsers(dest="action", required=True)
    b_key = bun.add_parser("keygen", help="write a new Ed25519 signing key KEY and its public key KEY.pub")
    b_key.add_argument("key")
    b_new = bun.add_parser("create", help="bundle a run folder's (or a saved model's) model, signed")
    b_new.add_argument("folder")
    b_new.add_argument("--key", required=True, help="the private signing key")
    b_new.add_argument("--version", required=True, help="the model's version, e.g. 1.4.0")
    b_new.add_argument("--output", "-o", required=True, help="the bundle file to write")
    b_new.add_argument("--name", help="the model's name (default: the folder's)")
    b_new.add_argument("--target", help="the device profile the model is built for")
    b_chk = bun.add_parser("verify", help="check a bundle's signature, files and version")
    b_chk.add_argument("bundle")
    b_chk.add_argument("--key", required=True, help="the signer's public key")
    b_chk.add_argument("--installed", help="the version installed now: an older or equal bundle is refused")
    b_ins = bun.add_parser("install", help="verify a bundle and install its model into a folder")
    b_ins.add_argument("bundle")
    b_ins.add_argument("dest")
    b_ins.add_argument("--key", required=True, help="the signer's public key")
    args, extra = parser.parse_known_args(argv)
    if args.command in ("bundle", "export", "bench"):
        # Made of models and run folders, not recipes: nothing to parse first.
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        return {"bundle": _bundle, "export": _export, "bench": _bench}[args.command](args)
    # Overrides may also follow the options (`run R -o out a.b=1`), where argparse leaves them.
    unknown = [a for a in extra if a.startswith("-") or "=" not in a]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = [*args.overrides, *extra]

    from slimkit.recipe import Recipe

    try:
        recipe = Recipe.from_file(args.recipe, args.overrides)
        if args.command == "validate":
            print(f"{args.recipe}: valid ({len(recipe.stages)} stage(s), {len(recipe.compare)} compared variant(s))")
            return 0
        if args.command == "profile":
            _profile(recipe, args)
            return 0
        from slimkit.runner import run

        out = run(recipe, args.output, progress=not args.no_progress)
    except SlimkitError as e:
        print(f"slimkit: error: {e}", file=sys.stderr)
        return 2
    print(f"run folder: {out}")
    print(f"report:     {out / 'report.html'}")
    return 0


def _numbers(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: give numbers separated by commas, e.g. 1,2") from None


def _bench(args: argparse.Namespace) -> int:
    from slimkit.atomic import write_json
    from slimkit.benching import bench, table, write_into_run

    try:
        if args.rounds < 1:
            raise ConfigError(f"--rounds {args.rounds}: give 1 or more")
        result = bench(args.source, _numbers(args.threads, "--threads"), _numbers(args.batch_sizes, "--batch-sizes"),
                       [b for b in args.backends.split(",") if b], args.recipe, rounds=args.rounds)
    except SlimkitError as e:
        print(f"slimkit: error: {e}", file=sys.stderr)
        return 2
    print(table(result))
    if args.json:
        write_json(args.json, result)
        print(f"rows:       {args.json}")
    report = write_into_run(args.source, result)
    if report is not None:
        print(f"report:     {report} (section Backends; rows in bench.json)")
    return 0


def _export(args: argparse.Namespace) -> int:
    from slimkit.exporting import export_model

    try:
        if args.calibration_samples < 1:
            raise ConfigError(f"--calibration-samples {args.calibration_samples}: give 1 or more")
        report = export_model(args.source, args.precision, args.output, args.recipe, args.calibration_samples)
    except SlimkitError as e:
        print(f"slimkit: error: {e}", file=sys.stderr)
        return 2
    print(f"{args.output}: {report['precision']} ONNX, against PyTorch: max abs diff {report['max_abs_diff']:.3g}, "
          f"cosine {report['cosine']:.6f}")
    return 0


def _bundle(args: argparse.Namespace) -> int:
    from slimkit.deploy import bundle

    try:
        if args.action == "keygen":
            private, public = bundle.generate_key(args.key)
            print(f"private key: {private} (keep it secret)")
            print(f"public key:  {public} (give it to the devices)")
        elif args.action == "create":
            m = bundle.create_bundle(args.folder, args.key, args.output, args.version, args.name, args.target)
            print(f"bundle: {args.output} ({m['model']['name']} {m['model']['version']}, {len(m['files'])} files, "
                  f"signer {m['signer'][:16]}...)")
        elif args.action == "verify":
            m = bundle.verify_bundle(args.bundle, args.key, args.installed)
            print(f"{args.bundle}: verified ({m['model']['name']} {m['model']['version']}, {len(m['files'])} files)")
        else:
            m = bundle.install_bundle(args.bundle, args.key, args.dest)
            print(f"installed {m['model']['name']} {m['model']['version']} into {args.dest}")
    except SlimkitError as e:
        print(f"slimkit: error: {e}", file=sys.stderr)
        return 2
    return 0


def _profile(recipe: Recipe, args: argparse.Namespace) -> None:
    """Profile the recipe's source model on the harness's inputs at batch 1."""
    import torch

    from slimkit.atomic import write_json
    from slimkit.memory.profile_table import print_profile
    from slimkit.memory.profiler import profile
    from slimkit.serialize import load_model

    if args.top < 0:
        raise ConfigError(f"--top {args.top}: give a count of tensors to list, 0 or more")
    spec, m = recipe.spec, recipe.spec.measure
    device = ("cuda" if torch.cuda.is_available() else "cpu") if m.device == "auto" else m.device
    torch.set_num_threads(m.threads)
    model = load_model(spec.model)
    inputs = _harness_inputs(recipe, model)
    result = profile(model.module.to(device), inputs, train=args.train, top_k=args.top,
                     snapshot=args.snapshot)
    print_profile(result, title=spec.name)
    advice = _advise(recipe, args, model.module.to(device), inputs) if args.devices else None
    if args.json:
        named = inputs.items() if isinstance(inputs, dict) else (
            (f"input[{i}]", t) for i, t in enumerate(inputs))
        shapes = {k: list(v.shape) for k, v in named if isinstance(v, torch.Tensor)}
        advised = {"advice": advice.to_dict()} if advice is not None else {}
        write_json(args.json, {"recipe": spec.name, "model": spec.model, "inputs": shapes, **result.to_dict(), **advised})
        print(f"profile:    {args.json}")


def _advise(recipe: Recipe, args: argparse.Namespace, module, inputs):
    """Each strategy's memory per device for the recipe's training, from a measured step."""
    from pydantic import ByteSize, TypeAdapter, ValidationError

    from slimkit.parallel.advisor import advise, render
    from slimkit.parallel.footprint import measure_footprint

    if not args.train:
        raise ConfigError("--devices estimates training memory: add --train")
    if args.devices < 1:
        raise ConfigError(f"--devices {args.devices}: give a number of devices, 1 or more")
    if not args.device_memory:
        raise ConfigError("--devices needs --device-memory, the memory of one device (e.g. 80GiB)")
    try:
        memory = int(TypeAdapter(ByteSize).validate_python(args.device_memory))
    except ValidationError:
        raise ConfigError(f"--device-memory {args.device_memory!r}: write a size such as 16GB or 80GiB") from None
    training = next((c for c in recipe.prepare + recipe.stages if c.kind in ("train", "distill")), None)
    batch = args.batch or (training.batch_size * training.grad_accum if training is not None else None)
    if batch is None:
        raise ConfigError("the recipe has no train or distill stage to take the batch from; give --batch")
    if batch < 1:
        raise ConfigError(f"--batch {batch}: give a batch of 1 or more examples")
    footprint = measure_footprint(module, inputs, examples=1, description=recipe.spec.model)
    advice = advise(footprint, args.devices, memory, batch, optimizer=getattr(training, "optimizer", "adamw"),
                    mixed_precision=recipe.spec.parallel.mixed_precision, tp_degree=recipe.spec.parallel.tp_degree)
    print()
    print(render(advice))
    return advice


def _harness_inputs(recipe: Recipe, model: LoadedModel) -> dict | tuple:
    """The inputs ``slimkit run`` times, at batch 1: real text of ``measure.seq_len`` tokens
    for a text model, a test image at the task's size for an image model, else the model's
    example inputs cut to one row."""
    import torch

    from slimkit.measure.image_workload import is_image_task
    from slimkit.measure.workloads import workload_for

    spec = recipe.spec
    if model.tokenizer is not None or is_image_task(spec.task):
        workload = workload_for(spec.task, model, spec.measure.seq_len)
        return workload.torch_inputs(workload.timing_feed(1), "cpu")
    if not model.example_inputs:
        raise ConfigError(
            f"model: {spec.model!r} has no tokenizer and no example inputs to profile with; "
            "return (module, example_inputs) from the model's factory"
        )
    # A copy, not a view: a view would keep (and count) the whole example batch.
    return tuple(t[:1].clone() if isinstance(t, torch.Tensor) and t.dim() > 0 else t for t in model.example_inputs)


if __name__ == "__main__":
    sys.exit(main())
