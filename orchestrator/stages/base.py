"""What a stage is to the job graph: a config section, the inputs it depends on, and a run."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol

from pydantic import BaseModel

from orchestrator.recipe.schema import Recipe
from orchestrator.rundir import RunDir
from workers.run_layout import RunLayout
from workers.tracking import NullTracker, Tracker


@dataclass
class StageContext:
    recipe: Recipe
    run_dir: RunDir
    tracker: Tracker = NullTracker()  # the stage's MLflow run, for loops that log as they go
    tracking: Optional[Any] = None  # the pipeline's TrackingSession, for stages with nested sub-runs
    log_dir: Optional[str] = None  # this attempt's `<run>/logs/<stage>/attempt-<n>/`: the workers' log files go here
    console: Optional[Any] = None  # the run's orchestrator.console.Console, for a stage that draws its own live line

    @property
    def layout(self) -> RunLayout:
        return self.run_dir.layout

    def worker_tracker(self, key: str) -> Tracker:
        """The tracker to ship to training workers (their records reach MLflow through the driver)."""
        return self.tracking.worker_tracker(key) if self.tracking is not None else NullTracker()


@dataclass
class StageResult:
    stats: dict[str, Any]  # for people and MLflow
    outputs: dict[str, str]  # file relative to the stage folder -> sha256
    output: BaseModel  # the typed record the next stages read (workers.stage_outputs)
    model_dir: Optional[str] = None  # an exported Hugging Face model, logged to MLflow as a model


class Stage(Protocol):
    name: str

    def config(self, recipe: Recipe) -> dict[str, Any]:
        """The recipe values this stage's outputs depend on (part of its fingerprint)."""

    def inputs(self, ctx: StageContext) -> dict[str, Any]:
        """Identity of what the stage reads: upstream fingerprints, source files (part of its fingerprint)."""

    def run(self, ctx: StageContext) -> StageResult:
        ...
