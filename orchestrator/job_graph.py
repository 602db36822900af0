"""Running the job graph: each stage is skipped when its manifest matches, else (re)done.

Rerunning the same command is how an interrupted job resumes: finished stages are skipped, and an
unfinished one continues from what its interrupted attempt left (shards, checkpoints) when its
fingerprint is unchanged, or starts clean when the recipe or its inputs changed.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from typing import Callable, Iterable, Optional

from orchestrator.manifest import MANIFEST, fingerprint, read_manifest, why_stale, write_manifest
from orchestrator.recipe.schema import Recipe
from orchestrator.tracking import TrackingSession, flatten_params
from orchestrator.rundir import RunDir, RunDirError
from orchestrator.stages import ORDER, STAGES, StageContext
from pipelines.atomic import write_json_atomic

ATTEMPT = "attempt.json"


def select_stages(recipe: Recipe, requested: Optional[Iterable[str]]) -> list[str]:
    wanted = list(requested) if requested else list(recipe.stages)
    unknown = [s for s in wanted if s not in STAGES]
    if unknown:
        raise ValueError(f"--stages: unknown stage(s) {', '.join(unknown)} (known: {', '.join(ORDER)})")
    return [s for s in ORDER if s in wanted]


def run_pipeline(recipe: Recipe, run_dir: str, stages: Optional[Iterable[str]] = None, force: bool = False,
                 console: Callable[[str], None] = print) -> dict[str, dict]:
    """Run the selected stages in order; returns stage -> manifest."""
    selected = select_stages(recipe, stages)
    rd = RunDir(run_dir)
    rd.acquire(console)
    manifests: dict[str, dict] = {}
    connected = False
    tracking = None
    try:
        console(f"pofa: run directory {rd.where}")
        if rd.store.remote:
            fetched = rd.sync_down()
            console(f"pofa: working copy {rd.path} ({fetched} files fetched from the store)")
        rd.check_recipe(recipe, force)
        tracking = open_tracking(recipe, rd)  # before any cluster work: an unreachable server fails here
        rd.write_recipe(recipe)
        tracking.log_artifact(os.path.join(rd.path, "recipe.yaml"))
        for name in selected:
            stage = STAGES[name]
            ctx = StageContext(recipe, rd, rd.stage_dir(name))
            config, inputs = stage.config(recipe), stage.inputs(ctx)
            fp = fingerprint({"stage": name, "config": config, "inputs": inputs})
            reason = "--force" if force else why_stale(ctx.stage_dir, fp)
            if reason is None:
                console(f"[{name}] up to date (manifest matches): skipped")
                manifests[name] = read_manifest(ctx.stage_dir) or {}
                continue
            resumed = _prepare_attempt(ctx.stage_dir, fp, clean=force)
            if not resumed:
                rd.clear_remote(name)
            rd.sync_up(name)  # the attempt record: a rerun elsewhere continues this attempt
            console(f"[{name}] running ({reason})")
            if not connected and getattr(stage, "needs_ray", True):
                from orchestrator.ray_runtime import connect

                address = connect(recipe.ray)
                console(f"pofa: Ray at {address}")
                tracking.set_tags({"ray.address": address})
                connected = True
            tracking.start_stage(name, params=flatten_params(config), fresh=not resumed)
            ctx.tracker = tracking.tracker(name)
            ctx.tracking = tracking
            started = time.time()
            try:
                result = stage.run(ctx)
            except BaseException as exc:
                tracking.end_stage(name, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
                raise
            manifests[name] = write_manifest(ctx.stage_dir, name, fp, inputs, config, result.stats, result.outputs,
                                             started)
            rd.sync_up()  # the stage's outputs, then its manifest; recipe and tracking store with them
            record_stage(tracking, name, manifests[name], ctx.stage_dir, result.model_dir, console)
            console(f"[{name}] done in {manifests[name]['wall_time_s']:.1f}s")
        tracking.finish("FINISHED")
        rd.sync_up()
        view = tracking.how_to_view()
        if view:
            console(view)
    except BaseException as exc:
        if tracking is not None:
            tracking.finish("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            try:
                rd.sync_up()  # keep what the failed attempt finished (and the run's tracking) durable
            except RunDirError:
                pass  # the original error matters more
        raise
    finally:
        rd.release()
    return manifests


def open_tracking(recipe: Recipe, rd: RunDir) -> TrackingSession:
    """The run directory's MLflow parent run (reused on every rerun). The full recipe becomes its params the
    first time; a rerun with changed values records them on the stage runs it redoes instead, since
    MLflow params cannot change."""
    first = not os.path.exists(os.path.join(rd.path, "tracking.json"))
    return TrackingSession.open(recipe.tracking, rd.path, recipe=recipe.model_dump(mode="json") if first else None,
                                run_name=os.path.basename(rd.path),
                                remote_run_dir=rd.where if rd.store.remote else None)


def record_stage(tracking: TrackingSession, name: str, manifest: dict, stage_dir: str, model_dir: Optional[str],
                 console: Callable[[str], None]) -> None:
    """The manifest's statistics as metrics; manifest, sparsity report, plots and model as artifacts.

    Tracking problems after a stage finished only warn: the stage's outputs are safe on disk, and a
    multi-day run must not fail over a plot."""
    if name in ("preprocess", "finetune"):  # training stages log their metrics step by step as they run
        numeric = {k: float(v) for k, v in flatten_params(manifest["stats"]).items() if _is_number(v)}
        tracking.log_metrics(numeric, step=0, key=name)
    tracking.log_artifact(os.path.join(stage_dir, MANIFEST), key=name)
    if model_dir:
        for report in ("sparsity.json", "sparsity.png"):
            if os.path.exists(os.path.join(model_dir, report)):
                tracking.log_artifact(os.path.join(model_dir, report), "sparsity", key=name)
        try:
            tracking.flush()
            tracking.log_stage_plots(name, os.path.join(stage_dir, "plots"))
            tracking.log_model(model_dir, key=name, name=f"{name}-model")
        except Exception as exc:  # noqa: BLE001 - see docstring
            console(f"[{name}] warning: could not record plots/model in MLflow: {exc}")
    tracking.end_stage(name, "FINISHED")


def _is_number(v: object) -> bool:
    try:
        float(v)  # type: ignore[arg-type]
        return not isinstance(v, bool)
    except (TypeError, ValueError):
        return False


def _prepare_attempt(stage_dir: str, fp: str, clean: bool) -> bool:
    """Keep an interrupted attempt's partial work only if it was made with the same fingerprint.
    Returns whether an earlier attempt is being continued."""
    attempt = os.path.join(stage_dir, ATTEMPT)
    previous = None
    if os.path.exists(attempt):
        with open(attempt) as f:
            previous = json.load(f).get("fingerprint")
    resumed = not clean and previous == fp
    if not resumed:
        shutil.rmtree(stage_dir, ignore_errors=True)
    os.makedirs(stage_dir, exist_ok=True)
    manifest = os.path.join(stage_dir, MANIFEST)
    if os.path.exists(manifest):
        os.unlink(manifest)  # an unfinished stage must never look finished
    write_json_atomic({"fingerprint": fp, "started": time.time()}, attempt)
    return resumed
