"""Running the job graph: the plan (`orchestrator.plan`) says, for each stage, skip, resume, run or
redo; the stages then run in order.

Rerunning the same command is how an interrupted job resumes: finished stages are skipped, and an
unfinished one continues from what its interrupted attempt left (shards, checkpoints). Operational
changes (workers, cadence, failure policy) resume too; a result-defining change to a stage that
holds progress is refused before any cluster work unless the user names the stage (`--redo`).
"""
from __future__ import annotations

import os
import shutil
import threading
import time
from typing import Callable, Iterable, Optional

from orchestrator.console import Console, as_console
from orchestrator.fingerprints import fingerprint, write_stage_manifest
from orchestrator.plan import PlanRefused, plan_run, refusal
from orchestrator.ray_leftovers import stop_leftovers
from orchestrator.stall_budget import check_stall_budget
from orchestrator.recipe.schema import Recipe
from orchestrator.run_logs import RunLogs
from orchestrator.run_summary import result_line
from orchestrator.rundir import RunDir, RunDirError
from orchestrator.stages import STAGES, StageContext
from orchestrator.tracking import TrackingSession, flatten_params
from orchestrator.tracking.datasets import pretraining_datasets
from orchestrator.tracking.results import stage_metrics
from workers.errors import first_line
from pipelines.atomic import write_json_atomic
from pipelines.sparsity.report_files import report_paths
from workers import preemption
from workers.run_layout import RunLayout
from workers.run_records import FailureRecord, write_record
from workers.stage_outputs import StageManifest, load_manifest



def select_stages(recipe: Recipe, requested: Optional[Iterable[str]]) -> list[str]:
    wanted = list(requested) if requested else list(recipe.stages)
    unknown = [s for s in wanted if s not in STAGES]
    if unknown:
        raise ValueError(f"--stages: unknown stage(s) {', '.join(unknown)} (known: {', '.join(STAGES)})")
    return [s for s in STAGES if s in wanted]  # the registry's order: upstream first


def run_pipeline(recipe: Recipe, run_dir: str, stages: Optional[Iterable[str]] = None, force: bool = False,
                 console: Callable[[str], None] = print, redo: Iterable[str] = ()) -> dict[str, StageManifest]:
    """Run the selected stages in order; returns stage -> manifest. `redo`: stages to start over.
    `console`: an orchestrator.console.Console draws live lines and sends the rest to `<run>/logs/`
    (unless verbose); a plain callable gets the lines alone and output stays where it is."""
    selected = select_stages(recipe, stages)
    redo = check_redo(redo)
    check_grace(recipe.ray.preemption_grace_s)
    console = as_console(console)
    rd = RunDir(run_dir)
    rd.acquire(console)
    layout = rd.layout  # after acquire: on an object store it carries the lease
    handler = preemption.DriverHandler(recipe.ray.preemption_grace_s, lambda: preemption.request_run(layout.where),
                                       console)
    if threading.current_thread() is threading.main_thread():
        handler.install()
    manifests: dict[str, StageManifest] = {}
    connected = False
    tracking = None
    logs = RunLogs(layout, capture=not console.verbose, warn=console)
    try:
        console(f"pofa: run directory {rd.where}")
        stop_leftovers(layout.ray_instance, console)  # what a SIGKILL of an earlier run left running
        logs.start()
        console.capturing = logs.driver_log is not None
        if console.capturing:
            console(f"pofa: logs in {layout.logs} (-v shows everything live)")
        if rd.store.remote:
            fetched = rd.sync_down()
            console(f"pofa: working copy {rd.path} ({fetched} files fetched from the store)")
        rd.check_recipe(recipe, force)
        plans = {p.stage: p for p in plan_run(recipe, StageContext(recipe, rd), selected, force, redo)}
        refused = refusal(list(plans.values()))
        if refused:
            raise PlanRefused(refused)
        # resumed stages only: a redone one starts from nothing, its old start-ups are gone with it
        check_stall_budget(recipe.ray.stall_timeout_s, layout, [s for s in selected if plans[s].action == "resume"])
        tracking = open_tracking(recipe, rd)  # before any cluster work: an unreachable server fails here
        rd.write_recipe(recipe)
        tracking.log_artifact(layout.recipe)
        for name in selected:
            if preemption.driver_noticed():  # between stages: nothing to checkpoint, stop here
                raise preemption.Preempted(name, None, None)
            stage, plan = STAGES[name], plans[name]
            ctx = StageContext(recipe, rd)
            if plan.action == "skip":
                console(f"[{name}] up to date (manifest matches): skipped")
                manifests[name] = load_manifest(layout, name)  # type: ignore[assignment]
                continue
            # an upstream stage that ran just now changed this one's inputs: recompute them
            config, inputs = stage.config(recipe), stage.inputs(ctx)
            fp = fingerprint({"stage": name, "config": config, "inputs": inputs})
            _prepare_attempt(layout, name, fp, config, inputs, clean=plan.action == "redo")
            resumed = plan.action == "resume"
            rd.sync_up(layout.stage_dir(name))  # the attempt record: a rerun elsewhere continues this attempt
            if resumed and plan.reason.startswith("resuming"):
                console(f"[{name}] {plan.reason}")  # e.g. "resuming from step 50 (checkpoint ...)"
            else:
                why = "" if plan.reason == "not started" else f" ({plan.reason})"  # a first start needs no reason
                console(f"[{name}] {'resuming' if resumed else 'running'}{why}")
            ctx.log_dir = logs.stage(name)
            ctx.console = console
            if not connected and stage.needs_ray:
                from orchestrator.ray_runtime import connect

                address = connect(recipe.ray, log_to_driver=console.verbose, instance_record=layout.ray_instance)
                if threading.current_thread() is threading.main_thread():
                    handler.install()  # again: Ray's start installs its own SIGTERM handler (abort)
                preemption.clear_run(layout.where)  # a notice left by a preempted earlier attempt
                console(f"pofa: Ray at {address}")
                tracking.set_tags({"ray.address": address})
                connected = True
            tracking.start_stage(name, params=flatten_params(config), fresh=not resumed)
            ctx.tracker = tracking.tracker(name)
            ctx.tracking = tracking
            tracking.observer = console.progress
            total = stage.live_total(recipe)
            if total:
                console.begin(name, total)
            started = time.time()
            try:
                result = stage.run(ctx)
            except BaseException as exc:
                console.end(name)
                stopped = isinstance(exc, (KeyboardInterrupt, preemption.Preempted))
                tracking.end_stage(name, "KILLED" if stopped else "FAILED")
                if not stopped:
                    _report_failure(console, logs, layout, name, exc)
                raise
            console.end(name)
            rd.check_lease()  # a process that lost the run never marks a stage finished
            if not isinstance(result.output, stage.output_model):
                raise TypeError(f"[{name}] returned a {type(result.output).__name__} record, not its output model "
                                f"{stage.output_model.__name__}: a bug in the stage; its outputs are kept")
            manifests[name] = write_stage_manifest(layout, name, fp, inputs, config, result.stats, result.outputs,
                                                   result.output, started)
            _write_cards(recipe, layout, name, console)  # before MLflow logs the models: it records the cards
            rd.sync_up()  # the stage's outputs, then its manifest; recipe and tracking store with them
            record_stage(tracking, name, manifests[name], layout, result.model_dir, console)
            logs.end_stage()
            console(result_line(name, manifests[name], layout))
        tracking.finish("FINISHED")
        rd.sync_up()
        view = tracking.how_to_view()
        if view:
            console(view)
    except BaseException as exc:
        if tracking is not None:
            tracking.finish("KILLED" if isinstance(exc, (KeyboardInterrupt, preemption.Preempted)) else "FAILED")
            try:
                rd.sync_up()  # keep what the failed attempt finished (and the run's tracking) durable
            except RunDirError:
                pass  # the original error matters more
        raise
    finally:
        handler.uninstall()
        logs.close()
        console.capturing = False
        rd.release()
    return manifests


def _write_cards(recipe: Recipe, layout: RunLayout, stage: str, console: Callable[[str], None]) -> None:
    """A model card into each export of the stage; a card that cannot be written only warns (the stage's
    outputs are safe, and the report and `pofa export` write cards again)."""
    from orchestrator.model_card.write import write_stage_cards

    try:
        write_stage_cards(recipe, layout, stage)
    except Exception as exc:  # noqa: BLE001 - see docstring
        console(f"[{stage}] warning: could not write the model cards: {exc}")


def _report_failure(console: Console, logs: RunLogs, layout: RunLayout, stage: str, exc: BaseException) -> None:
    """The error's first line, the stage and where the traceback is; the same in `<stage>/failure.json`
    for `pofa status`."""
    log = logs.record_failure(exc)
    first = first_line(exc)
    console(f"[{stage}] failed: {first}")
    if log:
        console(f"[{stage}] traceback and the workers' logs: {os.path.dirname(log)}")
    try:
        write_record(FailureRecord(error=first, type=type(exc).__name__, log=log, time=time.time()),
                     layout.failure(stage))
    except OSError:
        pass  # the failure itself matters more
    exc.pofa_reported = True  # type: ignore[attr-defined]




def open_tracking(recipe: Recipe, rd: RunDir) -> TrackingSession:
    """The run directory's MLflow parent run (reused on every rerun). The full recipe becomes its params the
    first time; a rerun with changed values records them on the stage runs it redoes instead, since
    MLflow params cannot change."""
    check_register(recipe)
    first = not os.path.exists(rd.layout.tracking_registry)
    return TrackingSession.open(recipe.tracking, rd.layout, recipe=recipe.model_dump(mode="json") if first else None,
                                run_name=os.path.basename(rd.path))


def check_register(recipe: Recipe) -> None:
    """`tracking.register_models` names exports this recipe makes: a typo fails before any work, not after it."""
    known = [name for stage in STAGES.values() for name in stage.export_names(recipe)]
    unknown = [k for k in recipe.tracking.register_models if k not in known]
    if unknown:
        raise ValueError(f"tracking.register_models: {', '.join(map(repr, unknown))} is not an export of this recipe "
                         f"(its exports: {', '.join(known)})")


def record_stage(tracking: TrackingSession, name: str, manifest: StageManifest, layout: RunLayout,
                 model_dir: Optional[str], console: Callable[[str], None]) -> None:
    """The manifest's statistics as metrics, the run's headline results on the parent run, the data as
    MLflow datasets; manifest, sparsity report, plots as artifacts; every export as an MLflow model with
    its metrics and params (registered where `tracking.register_models` names it).

    Tracking problems after a stage finished only warn: the stage's outputs are safe on disk, and a
    multi-day run must not fail over a plot."""
    if STAGES[name].logs_stats_at_end:
        tracking.log_metrics(stage_metrics(manifest.stats), step=0, key=name)
    tracking.log_artifact(layout.manifest(name), key=name)
    try:
        tracking.log_metrics(STAGES[name].headline_metrics(manifest, layout))  # the parent run: runs compare by these
        data = load_manifest(layout, "preprocess") if STAGES[name].reads_pretraining_data else None
        if data is not None:
            records = pretraining_datasets(data)
            tracking.log_datasets(records, key=name)
            if name == "preprocess":
                tracking.log_datasets(records)
        exported = STAGES[name].exports(manifest, layout)
        for export in exported:
            for report in report_paths(export.folder):
                if report.exists():
                    tracking.log_artifact(str(report), "sparsity", key=name)
        if model_dir or exported:
            tracking.flush()
            tracking.log_stage_plots(name, layout.plots(name))
        for export in exported:
            registered = tracking.config.register_models.get(export.name)
            tracking.log_model(export.folder, key=name, name=export.name.replace("/", "-") + "-model",
                               task=export.task, registered_model_name=registered, metrics=export.metrics,
                               params=export.params, step=export.step)
    except Exception as exc:  # noqa: BLE001 - see docstring
        console(f"[{name}] warning: could not record results/plots/model in MLflow: {exc}")
    tracking.end_stage(name, "FINISHED")


def _prepare_attempt(layout: RunLayout, stage: str, fp: str, config: dict, inputs: dict, clean: bool) -> None:
    """Start the stage over (`clean`, the plan's redo: its files go, locally and in the store) or keep
    what an earlier attempt left; record this attempt's fingerprint, config and inputs."""
    stage_dir = layout.stage_dir(stage)
    if clean:
        shutil.rmtree(stage_dir, ignore_errors=True)
        layout.delete_stored(stage_dir)
    os.makedirs(stage_dir, exist_ok=True)
    if os.path.exists(layout.manifest(stage)):
        os.unlink(layout.manifest(stage))  # an unfinished stage must never look finished
    if os.path.exists(layout.failure(stage)):
        os.unlink(layout.failure(stage))  # this attempt's outcome replaces the last one's
    write_json_atomic({"fingerprint": fp, "config": config, "inputs": inputs, "started": time.time()},
                      layout.attempt(stage))


GRACE_ENV = "POFA_TERMINATION_GRACE_S"  # set by the deploy manifests to the pods' terminationGracePeriodSeconds
GRACE_MARGIN_S = 5.0  # the stop itself (worker group shutdown, store sync) after the checkpoint


def check_grace(grace_s: float) -> None:
    """A grace period the pods do not allow would be cut short by SIGKILL: refused before any work."""
    allowed = os.environ.get(GRACE_ENV)
    if allowed and grace_s + GRACE_MARGIN_S > float(allowed):
        raise ValueError(f"ray.preemption_grace_s={grace_s:g} does not fit the pods' termination grace period of "
                         f"{float(allowed):g} s ({GRACE_ENV}) with {GRACE_MARGIN_S:g} s to spare: lower it or raise "
                         "terminationGracePeriodSeconds in the manifests")


def check_redo(redo: Iterable[str]) -> list[str]:
    """`--redo` names stages: an unknown one is an error before anything starts."""
    names = [s for s in redo if s]
    unknown = [s for s in names if s not in STAGES]
    if unknown:
        raise ValueError(f"--redo: unknown stage(s) {', '.join(unknown)} (known: {', '.join(STAGES)})")
    return names
