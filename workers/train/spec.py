"""What the orchestrator hands to a training stage, and what it gets back."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from pipelines.distillation_config import DistillationConfig
from pipelines.models.config import ModelConfig
from pipelines.sparsity.config import PruningConfig
from pipelines.training.config import TrainConfig
from workers.run_layout import RunLayout, TrainRunLayout
from workers.run_records import TrainSummary
from workers.tracking import NullTracker, Tracker

Stage = Literal["teacher", "student"]


@dataclass(frozen=True)
class FaultInjection:
    """Test hook: once (the marker file remembers), rank `rank` fails when it reaches optimizer step
    `step`: "raise" an error (a worker failure) or "stall": block forever on a lock (a real hang, for
    the stall watchdog, or so a test can kill the driver there)."""

    step: int
    marker: str
    rank: int = 0
    kind: Literal["raise", "stall"] = "raise"
    once: bool = True  # False: on every attempt (no marker written)


def check_tracker(tracker: Any) -> None:
    if not isinstance(tracker, Tracker):
        raise ValueError(f"tracker={tracker!r} does not implement workers.tracking.Tracker")


@dataclass
class TrainSpec:
    """Everything one pretraining stage needs; picklable (Ray ships it to every worker).

    Teacher: `model` (name/path or a from-scratch config). Student: `init_dir` (the teacher's export)
    is both the student's starting point and the frozen teacher, plus `pruning` and `distillation`.
    Every path comes from `layout`; the preprocess stage's output record says what the data are.
    """

    stage: Stage
    layout: RunLayout
    train: TrainConfig
    model: Optional[ModelConfig] = None
    init_dir: Optional[str] = None
    pruning: Optional[PruningConfig] = None
    distillation: Optional[DistillationConfig] = None
    seed: int = 42
    tracker: Any = field(default_factory=NullTracker)  # a workers.tracking.Tracker
    progress: bool = True  # rank 0 writes a progress line to its log every 5% of the steps
    log_dir: Optional[str] = None  # each worker's stdout/stderr go to <log_dir>/worker-<rank>.log
    resource_wait_s: float = 0.0  # wait this long for the cluster to hold the workers (ray.resource_wait_s)
    stall_timeout_s: float = 1800.0  # a worker without progress this long is stopped (ray.stall_timeout_s)
    fault: Optional[FaultInjection] = None
    # Set by the driver before each attempt: the newest checkpoint was written by another worker count
    # or ZeRO stage and is loaded from its universal form (workers/train/elastic.py).
    resume_universal: bool = False
    elastic: bool = True  # the data cursor is global: resumes on any number of workers

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
        check_tracker(self.tracker)

    @property
    def run(self) -> TrainRunLayout:
        return self.layout.training(self.stage)

    @property
    def input_paths(self) -> list[str]:
        """What the workers read from the run directory (pulled to each node's copy first)."""
        paths = [self.layout.split_dir("train"), self.layout.split_dir("validation"), self.layout.tokenizer,
                 self.layout.manifest("preprocess")]
        if self.init_dir and self.layout.contains(self.init_dir):
            paths.append(self.init_dir)
        return paths

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
    summary: TrainSummary  # the last attempt's train_summary.json
