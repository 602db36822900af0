"""What a stage is to the job graph and to every reader of a run: `Stage`, its context and its result."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from pydantic import BaseModel

from orchestrator.recipe.schema import Recipe
from orchestrator.rundir import RunDir
from orchestrator.tracking.results import Export
from workers.run_layout import RunLayout
from workers.stage_outputs import StageManifest
from workers.tracking import NullTracker, Tracker


def fmt(v: Any, digits: int = 4) -> str:
    """A metric as result lines show it ("-" when absent)."""
    return f"{v:.{digits}f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"


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


class Stage:
    """A stage owns its contract: what its outputs depend on (`config`, `inputs`), how it runs, and what
    plan, status, the closing table and tracking say of it. The job graph and those readers loop over
    stages and ask; a new stage is a subclass registered in `orchestrator.stages.STAGES`, no other edit."""

    name: str
    output_model: type[BaseModel]  # the typed record its manifest holds and the next stages read
    sections: tuple[str, ...] = ()  # the recipe sections it cannot run without
    needs_ray: bool = True  # False: runs in the driver alone (no Ray instance started or joined for it)
    rebuilt_freely: bool = False  # holds no training progress: redone whenever its inputs change, never refused
    headline: bool = False  # its result says what a run produced (`pofa runs` shows the latest such)
    logs_stats_at_end: bool = True  # False: it logs its metrics step by step as it runs (training)
    reads_pretraining_data: bool = False  # its MLflow run records preprocess's splits as dataset inputs

    def config(self, recipe: Recipe) -> dict[str, Any]:
        """The recipe values this stage's outputs depend on (part of its fingerprint)."""
        raise NotImplementedError

    def inputs(self, ctx: StageContext) -> dict[str, Any]:
        """Identity of what the stage reads: upstream fingerprints, source files (part of its fingerprint)."""
        raise NotImplementedError

    def run(self, ctx: StageContext) -> StageResult:
        raise NotImplementedError

    def result(self, manifest: StageManifest, layout: RunLayout) -> str:
        """The one result a person looks for first (console, closing table, `pofa status`)."""
        return "done"

    def outputs_path(self, manifest: StageManifest, layout: RunLayout) -> Optional[str]:
        """Where its outputs are, for the closing table."""
        return layout.stage_dir(self.name)

    def live_total(self, recipe: Recipe) -> int:
        """The steps its live line counts towards (0: no live line)."""
        return 0

    def held(self, layout: RunLayout) -> list[str]:
        """What of value an unfinished attempt holds besides a finished manifest (a redo would lose it)."""
        return []

    def progress(self, layout: RunLayout, recipe: Recipe) -> Optional[str]:
        """Where a rerun continues from; "at step N of M ..." marks a stage resumable at a step."""
        return ", ".join(self.held(layout)) or None

    def resume_point(self, layout: RunLayout) -> str:
        """How the stage continues, as its console header says it."""
        held = ", ".join(self.held(layout))
        return f"resuming its unfinished attempt ({held})" if held else "resuming its unfinished attempt"

    def headline_metrics(self, manifest: StageManifest, layout: RunLayout) -> dict[str, float]:
        """The few results runs are compared by, logged on the parent MLflow run (`student/sparsity`)."""
        return {}

    def export_names(self, recipe: Recipe) -> list[str]:
        """The exports it would make under this recipe, as `tracking.register_models` names them."""
        return []

    def exports(self, manifest: StageManifest, layout: RunLayout) -> list[Export]:
        """The models it exported, logged to MLflow as models when it finishes."""
        return []

    def attempt_files(self, layout: RunLayout) -> list[str]:
        """Its training runs' `attempts.jsonl` files (their measured start-ups bound the stall limit)."""
        return []
