"""The ``slimkit`` command: ``run`` and ``validate`` a recipe."""

from __future__ import annotations

import argparse
import sys

from slimkit.errors import SlimkitError


def main(argv: list[str] | None = None) -> int:
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
    args = parser.parse_args(argv)

    from slimkit.recipe import Recipe

    try:
        recipe = Recipe.from_file(args.recipe, args.overrides)
        if args.command == "validate":
            print(f"{args.recipe}: valid ({len(recipe.stages)} stage(s), {len(recipe.compare)} compared variant(s))")
            return 0
        from slimkit.runner import run

        out = run(recipe, args.output, progress=not args.no_progress)
    except SlimkitError as e:
        print(f"slimkit: error: {e}", file=sys.stderr)
        return 2
    print(f"run folder: {out}")
    print(f"report:     {out / 'report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
