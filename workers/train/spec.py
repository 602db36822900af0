"""What the orchestrator hands to a training stage, and what it gets back."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from pipelines.distillation import DistillationConfig
from pipelines.models.config import ModelConfig
from pipelines.sparsity.config import PruningConfig
from pipelines.training.config import TrainConfig
from workers.storage import RunStore
from workers.tracking import NullTracker, Tracker

Stage = Literal["teacher", "student"]


@dataclass(frozen=True)
class FaultInjection:
    """Test hook: once (the marker file remembers), rank `rank` fails when it reaches optimizer step
    `step`: "raise" an error (a worker failure) or "stall" (so a test can kill the driver there)."""

    step: int
    marker: str
    rank: int = 0
    kind: Literal["raise", "stall"] = "raise"


@dataclass
class TrainSpec:
    """Everything one training stage needs; picklable (Ray ships it to every worker).

    Teacher: `model` (name/path or a from-scratch config). Student: `init_dir` (the teacher's export)
    is both the student's starting point and the frozen teacher, plus `pruning` and `distillation`.
    """

    stage: Stage
    run_dir: str
    train: TrainConfig
    model: Optional[ModelConfig] = None
    init_dir: Optional[str] = None
    pruning: Optional[PruningConfig] = None
    distillation: Optional[DistillationConfig] = None
    seed: int = 42
    tracker: Any = field(default_factory=NullTracker)  # a workers.tracking.Tracker
    storage_path: Optional[str] = None  # Ray Train storage; default <run>/<stage>/ray
    experiment_name: Optional[str] = None  # Ray Train run name; default pofa-<stage>
    preprocess_dir: Optional[str] = None  # default <run>/preprocess
    progress: bool = True  # rank-0 progress bar
    resource_wait_s: float = 0.0  # wait this long for the cluster to hold the workers (ray.resource_wait_s)
    fault: Optional[FaultInjection] = None
    store: Optional[RunStore] = None  # set when the run directory lives on an object store (run_dir is its mirror)

    def __post_init__(self) -> None:
        if self.stage not in ("teacher", "student"):
            raise ValueError(f"stage={self.stage!r}: expected 'teacher' or 'student'")
        if self.stage == "teacher" and self.model is None and self.init_dir is None:
            raise ValueError("teacher stage needs `model` (or `init_dir`)")
        if self.stage == "student":
            if self.init_dir is None:
                raise ValueError("student stage needs `init_dir` (the teacher's exported model)")
            if self.distillation is None:
                self.distillation = DistillationConfig()
        if not isinstance(self.tracker, Tracker):
            raise ValueError(f"tracker={self.tracker!r} does not implement workers.tracking.Tracker")

    # -- derived paths -------------------------------------------------------------------------
    @property
    def stage_dir(self) -> str:
        return os.path.join(self.run_dir, self.stage)

    @property
    def checkpoint_dir(self) -> str:
        return os.path.join(self.stage_dir, "checkpoints")

    @property
    def model_dir(self) -> str:
        return os.path.join(self.stage_dir, "model")

    @property
    def metrics_path(self) -> str:
        return os.path.join(self.stage_dir, "metrics.jsonl")

    @property
    def summary_path(self) -> str:
        return os.path.join(self.stage_dir, "train_summary.json")

    @property
    def _preprocess(self) -> str:
        return self.preprocess_dir or os.path.join(self.run_dir, "preprocess")

    @property
    def train_data_dir(self) -> str:
        return os.path.join(self._preprocess, "train")

    @property
    def validation_data_dir(self) -> str:
        return os.path.join(self._preprocess, "validation")

    @property
    def tokenizer_dir(self) -> str:
        return os.path.join(self._preprocess, "tokenizer")

    @property
    def manifest_path(self) -> str:
        return os.path.join(self._preprocess, "manifest.json")

    @property
    def input_paths(self) -> list[str]:
        """What the workers read: pulled to each node's mirror when the run directory is remote."""
        return [self.train_data_dir, self.validation_data_dir, self.tokenizer_dir, self.manifest_path,
                self.init_dir or ""]

    @property
    def ray_storage_path(self) -> str:
        return self.storage_path or os.path.join(self.stage_dir, "ray")

    @property
    def ray_run_name(self) -> str:
        return self.experiment_name or f"pofa-{self.stage}"

    @property
    def seed_value(self) -> int:
        return self.train.resolved_seed(self.seed)


@dataclass
class TrainResult:
    stage: str
    model_dir: str
    final_step: int
    metrics: dict[str, float]  # last training and validation metrics
    checkpoint: Optional[str]  # the final step-N checkpoint
    start_steps: list[int]  # the step each attempt (first run, restarts, reruns) started from
    elapsed_s: float
