"""`pofa status [RUN_DIR]` and `pofa runs`: where a run stands, from its directory alone (no Ray, no
MLflow, no lock kept): each stage done (with its time and result), resumable at step N of M,
failed (the error's first line and its log), or not started; and whether a process holds the run now.

A run folder that was copied or moved has its MLflow store pointed at its new place here, while no
`pofa run` holds it (`orchestrator.tracking.relocate`): after `cp -r` and `pofa status`, MLflow opens it.
"""
from __future__ import annotations

import fcntl
import os
import time
from dataclasses import dataclass
from typing import Optional

import yaml
from pydantic import ValidationError

from orchestrator.console import format_duration
from orchestrator.recipe.schema import Recipe
from orchestrator.run_summary import key_result
from orchestrator.rundir import lock_holder
from orchestrator.stages import STAGES
from orchestrator.tracking.relocate import relocate_if_free
from workers.run_layout import RunLayout
from workers.run_records import FailureRecord, RecordError, read_record
from workers.stage_outputs import ManifestError, load_manifest
from workers.storage import is_uri


class StatusError(ValueError):
    """The folder cannot be read as a pofa run directory: one line that says why."""


@dataclass
class StageState:
    stage: str
    state: str  # done | resumable | failed | started | not started
    detail: str
    finished: Optional[float] = None  # when a done stage finished (epoch seconds)
    result: str = ""  # a done stage's key result

    def line(self) -> str:
        return f"  {self.stage:<10s} {self.state:<12s} {self.detail}".rstrip()


@dataclass
class RunState:
    path: str
    recipe: str
    running: Optional[str]  # who holds the run's lock now
    stages: list[StageState]

    def lines(self) -> list[str]:
        held = f" (running: {self.running})" if self.running else ""
        return [f"{self.path}  recipe {self.recipe}{held}"] + [s.line() for s in self.stages]

    def one_line(self) -> str:
        done = sum(s.state == "done" for s in self.stages)
        current = next((s for s in self.stages if s.state != "done"), None)
        where = "all done" if current is None else f"{current.stage} {current.state}"
        if current is not None and current.state in ("resumable", "failed"):
            where += f" ({current.detail.split(';')[0][:60]})"
        finished = [s.finished for s in self.stages if s.finished]
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(max(finished))) if finished else "-" * 16
        headline = next((f"  {s.stage}: {s.result}" for s in reversed(self.stages)
                         if s.state == "done" and STAGES[s.stage].headline and s.result), "")
        return (f"{os.path.basename(self.path):<36s} {when}  {done}/{len(self.stages)} stages  {where}"
                + ("  [running]" if self.running else "") + headline)


def run_state(path: str) -> RunState:
    if is_uri(path):
        raise StatusError(f"{path}: pofa status reads a local run directory; on an object store, read a node's "
                          "mirror of it ($POFA_MIRROR_DIR/<scheme>/<bucket>/<prefix>)")
    if not os.path.isdir(path):
        raise StatusError(f"{path}: no such directory")
    layout = RunLayout.open(path)
    recipe = _recipe(layout)
    relocate_if_free(layout)  # a copied or moved run: its MLflow store follows it
    return RunState(path=layout.root, recipe=recipe.name, running=_holder(layout),
                    stages=[stage_state(layout, recipe, s) for s in recipe.stages])


def _recipe(layout: RunLayout) -> Recipe:
    try:
        with open(layout.recipe) as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError:
        raise StatusError(f"{layout.root} is not a pofa run directory (it holds no recipe.yaml)") from None
    except (OSError, yaml.YAMLError) as exc:
        raise StatusError(f"{layout.recipe}: not readable ({str(exc).splitlines()[0]})") from None
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise StatusError(f"{layout.root} was written by another pofa version: its recipe.yaml does not validate "
                          f"here ({where}: {err['msg']}); read it with the pofa version that wrote it") from None


def stage_state(layout: RunLayout, recipe: Recipe, stage: str) -> StageState:
    try:
        manifest = load_manifest(layout, stage)
    except ManifestError as exc:
        raise StatusError(str(exc).splitlines()[0]) from None
    if manifest is not None:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(manifest.finished))
        result = key_result(stage, manifest, layout)
        return StageState(stage, "done", f"in {format_duration(manifest.wall_time_s)} (finished {when}); {result}",
                          finished=manifest.finished, result=result)
    failure = _failure(layout, stage)
    progress = STAGES[stage].progress(layout, recipe)
    if failure is not None:
        text = failure.error
        if failure.log:
            text += f"; log {failure.log}"
        if progress:
            text += f"; {progress}"
        return StageState(stage, "failed", text)
    if progress and progress.startswith("at step"):
        return StageState(stage, "resumable", progress)
    if os.path.exists(layout.attempt(stage)):
        return StageState(stage, "started", progress or "no progress kept yet")
    return StageState(stage, "not started", "")


def _failure(layout: RunLayout, stage: str) -> Optional[FailureRecord]:
    """The stage's last failure; None when there is none. A bad record is a StatusError naming it."""
    try:
        return read_record(FailureRecord, layout.failure(stage), stage)
    except FileNotFoundError:
        return None
    except RecordError as exc:
        raise StatusError(str(exc)) from None


def _holder(layout: RunLayout) -> Optional[str]:
    """Who holds the run's lock (a `pofa run` in progress), without taking it for long."""
    try:
        f = open(layout.lock)
    except OSError:
        return None
    with f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            holder, opened_at = lock_holder(f.read())
            if opened_at and opened_at != layout.root:  # moved while it runs: it writes to the old place
                holder += f", which opened it at {opened_at} (moved since)"
            return holder
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    return None


def list_runs(root: str) -> list[str]:
    """Run directories under `root` (those holding a recipe.yaml), newest first."""
    if not os.path.isdir(root):
        raise StatusError(f"{root}: no such directory (runs are made there by `pofa run`)")
    found = [os.path.join(root, n) for n in os.listdir(root)
             if os.path.isfile(os.path.join(root, n, "recipe.yaml"))]
    return sorted(found, key=lambda p: os.path.getmtime(p), reverse=True)


def newest_run(root: str) -> str:
    runs = list_runs(root)
    if not runs:
        raise StatusError(f"{root} holds no run directory; name one: pofa status RUN_DIR")
    return runs[0]
