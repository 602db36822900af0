"""What a stage is to the pipeline runner: a config section, the inputs it depends on, and a run."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol

from workers.tracking import NullTracker, Tracker

from orchestrator.recipe.schema import Recipe
from orchestrator.rundir import RunDir


@dataclass
class StageContext:
    recipe: Recipe
    run_dir: RunDir
    stage_dir: str
    tracker: Tracker = NullTracker()  # the stage's MLflow run, for loops that log as they go
    tracking: Optional[Any] = None  # the pipeline's TrackingSession, for stages with nested sub-runs


@dataclass
class StageResult:
    stats: dict[str, Any]
    outputs: dict[str, str]  # path relative to the stage dir -> sha256
    model_dir: Optional[str] = None  # an exported Hugging Face model, logged to MLflow as a model


class Stage(Protocol):
    name: str

    def config(self, recipe: Recipe) -> dict[str, Any]:
        """The recipe values this stage's outputs depend on (part of its fingerprint)."""

    def inputs(self, ctx: StageContext) -> dict[str, Any]:
        """Identity of what the stage reads: upstream fingerprints, source files (part of its fingerprint)."""

    def run(self, ctx: StageContext) -> StageResult:
        ...
