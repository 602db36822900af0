"""`pofa`: run, validate and list recipes.

    pofa run RECIPE [--set a.b=value ...] [--run-dir DIR] [--stages s1,s2] [--redo s1,s2] [--force]
    pofa plan RECIPE [--set ...] [--run-dir DIR] [--stages ...] [--redo ...]
    pofa validate RECIPE [--set ...]
    pofa recipes
    pofa submit RECIPE --address http://HOST:8265 [--set ...] [--run-dir URI] [--wait]
    pofa status [RUN_DIR]          where a run stands, read from its directory (default: the newest in ./runs)
    pofa runs [--root runs]        every run under ./runs, a line each
    pofa status|logs|stop JOB [--address ...]
    pofa doctor [--build-ops]      this machine's DeepSpeed ops: cache folder, stale build locks, built ahead or not
    pofa export RUN_DIR [--stage student|teacher|finetune/TASK/SEED] --to DIR [--push REPO]
                                   one export as a Hugging Face folder with its model card (and on the hub)
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Optional, Sequence

from orchestrator.jobs_cli import JOB_COMMANDS, add_job_commands, run_job_command
from orchestrator.recipe.load import RecipeError, builtin_recipes, dump_recipe, load_recipe
from orchestrator.rundir import DEFAULT_ROOT, RunDirError, choose_run_dir
from workers import native_ops, preemption
from workers.native_ops import NativeOpsError
from workers.preemption import Preempted
from workers.run_layout import RunLayout


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pofa", description="Prune Once for All as a resumable job graph on Ray.")
    sub = p.add_subparsers(dest="command", required=True)

    def recipe_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("recipe", help="a YAML file or the name of a built-in recipe (see `pofa recipes`)")
        sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe value, e.g. --set preprocess.num_workers=4 (repeatable)")

    def run_args(sp: argparse.ArgumentParser) -> None:
        recipe_args(sp)
        sp.add_argument("--run-dir", help="run directory (default: resume the newest ./runs/<name>-* whose "
                                          "result-defining settings are the recipe's, or a new one)")
        sp.add_argument("--stages", help="comma-separated subset of stages to run, e.g. preprocess")
        sp.add_argument("--redo", default="", help="comma-separated stages to start over, deleting what they hold "
                                                   "(needed when a result-defining key of a stage with progress changed)")
        sp.add_argument("--force", action="store_true", help="redo every selected stage, whatever it holds")
        sp.add_argument("-v", "--verbose", action="store_true",
                        help="show every process's output live (default: one line per stage; the rest in <run>/logs/)")

    run_args(sub.add_parser("run", help="run the pipeline (rerun the same command to resume)"))
    runs = sub.add_parser("runs", help="every run directory under ./runs and where it stands")
    runs.add_argument("--root", default=DEFAULT_ROOT, help="the folder holding the runs (default: ./runs)")
    run_args(sub.add_parser("plan", help="print what `pofa run` would do to each stage: skip, resume, run or redo"))

    val = sub.add_parser("validate", help="print the resolved recipe, or its errors")
    recipe_args(val)
    sub.add_parser("recipes", help="list the built-in recipes")
    pre = sub.add_parser("preempt-node", help="this node is going away (a Kubernetes preStop hook): training "
                                              "workers here checkpoint and stop; waits until they did")
    pre.add_argument("--wait", type=float, default=50.0, help="seconds to wait for them at most")
    pre.add_argument("--whole-cluster", action="store_true", help="the head is going: every run on the cluster stops")
    doctor = sub.add_parser("doctor", help="check this machine's DeepSpeed ops: their cache folder, stale build "
                                           "locks (removed), and whether loading them would compile")
    doctor.add_argument("--build-ops", action="store_true",
                        help="build them ahead (`make install` and the images do), so no run compiles them")
    export = sub.add_parser("export", help="write one export of a run as a self-contained Hugging Face folder "
                                           "(weights, tokenizer, config, sparsity.json, model card)")
    export.add_argument("run_dir", help="the run directory")
    export.add_argument("--stage", default="student", help="student (default), teacher, or finetune/TASK/SEED "
                                                          "(SEED: a seed, or teacher for the dense task teacher)")
    export.add_argument("--to", required=True, help="the folder to write: new, or empty")
    export.add_argument("--push", metavar="REPO", help="then upload it to this Hugging Face model repo (needs a token)")
    add_job_commands(sub)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "export":
        return _export(args)
    if args.command == "runs" or (args.command == "status" and _is_run_dir(args.job)):
        return _status(args)
    if args.command in JOB_COMMANDS:
        return run_job_command(args)
    try:
        if args.command == "preempt-node":
            return _preempt_node(args.wait, args.whole_cluster)
        if args.command == "doctor":
            return _doctor(args.build_ops)
        if args.command == "recipes":
            recipes = builtin_recipes()
            width = max(map(len, recipes)) + 2
            for name, desc in recipes.items():
                print(f"{name:{width}s}{desc}")
            return 0
        if args.command == "run":
            native_ops.check_cache()  # this process and all it starts build DeepSpeed's ops one way, in one folder
        recipe = load_recipe(args.recipe, args.overrides)
        if args.command == "validate":
            print(dump_recipe(recipe), end="")
            return 0
        from orchestrator.job_graph import check_redo, select_stages

        stages = select_stages(recipe, args.stages.split(",") if args.stages else None)
        redo = check_redo(args.redo.split(","))
        run_dir = choose_run_dir(recipe, args.run_dir)
        if args.command == "plan":
            return _print_plan(recipe, run_dir, stages, args.force, redo)
        return _run(recipe, run_dir, stages, args.force, redo, args.verbose)
    except Preempted as exc:
        print(f"pofa: {exc}", file=sys.stderr, flush=True)
        return preemption.EXIT_CODE
    except BaseException as exc:
        if getattr(exc, "pofa_reported", False):  # the console named the stage, the error and its log
            return 1
        if isinstance(exc, (RecipeError, RunDirError, ValueError, NativeOpsError)):
            print(f"pofa: error: {exc}", file=sys.stderr)
            return 2
        raise


def _run(recipe: Any, run_dir: str, stages: list[str], force: bool, redo: list[str], verbose: bool) -> int:
    from orchestrator.console import Console
    from orchestrator.job_graph import run_pipeline
    from orchestrator.console import format_duration
    from orchestrator.run_summary import summary_lines

    # the console keeps the terminal; the processes' own output goes to <run>/logs/ (unless --verbose)
    terminal = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    console = Console(terminal, verbose=verbose)
    detach = console.attach()
    started = time.time()
    try:
        manifests = run_pipeline(recipe, run_dir, stages, force, console=console, redo=redo)
        for line in summary_lines(manifests, RunLayout.open(run_dir)):
            console(line)
        console(f"pofa: done in {format_duration(time.time() - started)} (this command: Ray start-up and "
                "tracking included)")
    finally:
        detach()
        terminal.flush()
    return 0


def _is_run_dir(target: Optional[str]) -> bool:
    """`pofa status X`: X names a run directory (a folder, a path) rather than a submitted job's id."""
    return target is None or os.path.isdir(target) or os.sep in target or target.startswith((".", "~"))


def _status(args: argparse.Namespace) -> int:
    from orchestrator.run_status import StatusError, list_runs, newest_run, run_state

    try:
        if args.command == "runs":
            paths = list_runs(args.root)
            if not paths:
                print(f"no runs under {os.path.abspath(args.root)}")
            for path in paths:
                try:
                    print(run_state(path).one_line())
                except StatusError as exc:
                    print(f"{os.path.basename(path):<36s} unreadable: {exc}")
            return 0
        path = os.path.expanduser(args.job) if args.job else newest_run(DEFAULT_ROOT)
        for line in run_state(path).lines():
            print(line)
        return 0
    except StatusError as exc:
        print(f"pofa: error: {exc}", file=sys.stderr)
        return 2


def _export(args: argparse.Namespace) -> int:
    from orchestrator.export_folder import export_folder

    try:
        folder = export_folder(args.run_dir, args.stage, args.to, args.push)
    except ValueError as exc:  # bad input (ExportError), an unfinished stage, an unreadable manifest
        print(f"pofa: error: {exc}", file=sys.stderr)
        return 2
    print(f"pofa: exported {args.stage} to {folder}" + (f" and pushed it to {args.push}" if args.push else ""))
    return 0


def _preempt_node(wait_s: float, whole_cluster: bool) -> int:
    import ray

    ray.init(address="auto", log_to_driver=False)
    node = ray.get_runtime_context().get_node_id()
    preemption.request_node(node, whole_cluster)
    stopped = preemption.wait_for_workers_to_stop(node, wait_s)
    print(f"pofa: preemption notice given to {'the cluster' if whole_cluster else 'node ' + node}; training workers "
          f"here {'stopped' if stopped else f'still running after {wait_s:g} s'}")
    return 0


def _doctor(build: bool) -> int:
    """Exit 0 when loading every op compiles nothing, 1 when one would be built at first use, 2 on an error."""
    folder = native_ops.check_cache()
    print(f"DeepSpeed ops folder: {folder} (root {native_ops.cache_root()[1]})")
    print(f"toolchain: {native_ops.toolchain().describe()}")
    native_ops.clear_stale_locks(say=print)
    if build:
        for op in native_ops.build_ops(say=print):
            print(f"{op.name}: {'built' if op.compiled else 'already built'} ({op.seconds:.1f} s)")
    pending = native_ops.pending_commands()
    for name, commands in pending.items():
        print(f"{name}: ready, loading it compiles nothing" if not commands else
              f"{name}: not built, loading it would run {len(commands)} build commands (`pofa doctor --build-ops`)")
    return 1 if any(pending.values()) else 0


def _print_plan(recipe: Any, run_dir: str, stages: list[str], force: bool, redo: list[str]) -> int:
    """Reads the run directory only: no lock, no Ray, no MLflow. Exit 1 when `run` would be refused."""
    from orchestrator.plan import plan_run
    from orchestrator.rundir import RunDir
    from orchestrator.stages import StageContext

    rd = RunDir(run_dir)
    if rd.store.remote:
        rd.sync_down()
    print(f"pofa: run directory {rd.where}")
    plans = plan_run(recipe, StageContext(recipe, rd), stages, force, redo)
    for p in plans:
        print(p.line())
    return 1 if any(p.refused for p in plans) else 0


if __name__ == "__main__":
    sys.exit(main())
