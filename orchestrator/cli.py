"""`pofa`: run, validate and list recipes.

    pofa run RECIPE [--set a.b=value ...] [--run-dir DIR] [--stages s1,s2] [--force]
    pofa validate RECIPE [--set ...]
    pofa recipes
    pofa submit RECIPE --address http://HOST:8265 [--set ...] [--run-dir URI] [--wait]
    pofa status|logs|stop JOB [--address ...]
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from orchestrator.jobs_cli import JOB_COMMANDS, add_job_commands, run_job_command
from orchestrator.recipe.load import RecipeError, builtin_recipes, dump_recipe, load_recipe
from orchestrator.rundir import RunDirError, choose_run_dir
from workers.run_layout import RunLayout
from workers.stage_outputs import StageManifest


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
    add_job_commands(sub)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.command in JOB_COMMANDS:
        return run_job_command(args)
    try:
        if args.command == "recipes":
            recipes = builtin_recipes()
            width = max(map(len, recipes)) + 2
            for name, desc in recipes.items():
                print(f"{name:{width}s}{desc}")
            return 0
        recipe = load_recipe(args.recipe, args.overrides)
        if args.command == "validate":
            print(dump_recipe(recipe), end="")
            return 0
        from orchestrator.job_graph import run_pipeline, select_stages

        stages = select_stages(recipe, args.stages.split(",") if args.stages else None)
        run_dir = choose_run_dir(recipe, args.run_dir)
        manifests = run_pipeline(recipe, run_dir, stages, args.force)
        _summary(manifests, run_dir)
        return 0
    except (RecipeError, RunDirError, ValueError) as exc:
        print(f"pofa: error: {exc}", file=sys.stderr)
        return 2


def _summary(manifests: dict[str, StageManifest], run_dir: str) -> None:
    """One screen at the end: data, teacher vs student, sparsity, time per stage, where to look."""
    def fmt(v: object) -> str:
        return f"{v:.4f}" if isinstance(v, float) else ("-" if v is None else str(v))

    pre = manifests["preprocess"].stats if "preprocess" in manifests else None
    print("\n== pofa summary ==")
    if pre:
        print(f"data      {pre['documents_train']} train / {pre['documents_validation']} validation documents, "
              f"{pre['instances_train']} / {pre['instances_validation']} instances, {pre['tokens']} tokens")
    rows = [(s, manifests[s].stats) for s in ("teacher", "student") if s in manifests]
    if rows:
        print(f"{'model':9s} {'val/mlm_acc':>11s} {'val/nsp_acc':>11s} {'val/loss':>9s} {'sparsity':>9s} {'steps':>6s}")
        for name, st in rows:
            print(f"{name:9s} {fmt(st.get('val/mlm_acc')):>11s} {fmt(st.get('val/nsp_acc')):>11s} "
                  f"{fmt(st.get('val/loss')):>9s} {fmt(st.get('sparsity/global')):>9s} {fmt(st.get('final_step')):>6s}")
    times = ", ".join(f"{s} {m.wall_time_s:.0f}s" for s, m in manifests.items() if m.wall_time_s)
    if times:
        print(f"time      {times} (this run's work; skipped stages show their original time)")
    if "report" in manifests:
        layout = RunLayout.open(run_dir)
        print(f"report    {layout.location_uri(layout.report) if layout.store.remote else layout.report}")


if __name__ == "__main__":
    sys.exit(main())
