"""`pofa`: run, validate and list recipes.

    pofa run RECIPE [--set a.b=value ...] [--run-dir DIR] [--stages s1,s2] [--force]
    pofa validate RECIPE [--set ...]
    pofa recipes
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from orchestrator.recipe.load import RecipeError, builtin_recipes, dump_recipe, load_recipe
from orchestrator.rundir import RunDirError, choose_run_dir


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pofa", description="Prune Once for All as a resumable job graph on Ray.")
    sub = p.add_subparsers(dest="command", required=True)

    def recipe_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("recipe", help="a YAML file or the name of a built-in recipe (see `pofa recipes`)")
        sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe value, e.g. --set preprocess.num_workers=4 (repeatable)")

    run = sub.add_parser("run", help="run the pipeline (rerun the same command to resume)")
    recipe_args(run)
    run.add_argument("--run-dir", help="run directory (default: resume ./runs/<name>-* of the same recipe, or a new one)")
    run.add_argument("--stages", help="comma-separated subset of stages to run, e.g. preprocess")
    run.add_argument("--force", action="store_true", help="redo the selected stages even if their manifests match")

    val = sub.add_parser("validate", help="print the resolved recipe, or its errors")
    recipe_args(val)
    sub.add_parser("recipes", help="list the built-in recipes")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "recipes":
            for name, desc in builtin_recipes().items():
                print(f"{name:28s} {desc}")
            return 0
        recipe = load_recipe(args.recipe, args.overrides)
        if args.command == "validate":
            print(dump_recipe(recipe), end="")
            return 0
        from orchestrator.pipeline import run_pipeline, select_stages

        stages = select_stages(recipe, args.stages.split(",") if args.stages else None)
        manifests = run_pipeline(recipe, choose_run_dir(recipe, args.run_dir), stages, args.force)
        _summary(manifests)
        return 0
    except (RecipeError, RunDirError, ValueError) as exc:
        print(f"pofa: error: {exc}", file=sys.stderr)
        return 2


def _summary(manifests: dict[str, dict]) -> None:
    pre = manifests.get("preprocess", {}).get("stats")
    if pre:
        keys = ["documents_train", "documents_validation", "documents_skipped", "sentences", "instances_train",
                "instances_validation", "tokens", "short_seq_fraction", "nsp_random_fraction", "masked_token_fraction"]
        print("preprocess:")
        for k in keys:
            v = pre.get(k)
            print(f"  {k:22s} {json.dumps(v) if isinstance(v, dict) else (f'{v:.4f}' if isinstance(v, float) else v)}")


if __name__ == "__main__":
    sys.exit(main())
