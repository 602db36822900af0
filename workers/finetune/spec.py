"""What one fine-tuning run (a task's dense teacher, or one seed of the sparse student) needs."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from pipelines.distillation import DistillationConfig
from pipelines.finetune.config import TaskConfig
from pipelines.sparsity.config import PruningConfig, ScheduleConfig
from pipelines.training.config import TrainConfig
from workers.storage import RunStore
from workers.tracking import NullTracker, Tracker
from workers.train.spec import FaultInjection

Role = Literal["teacher", "student"]


def lock_config() -> PruningConfig:
    """The pattern lock: masks taken from the zeros the weights have when training starts, never
    recomputed (the sparsity core's constant schedule). Heads stay dense (default excludes)."""
    return PruningConfig(schedule=ScheduleConfig(kind="constant", final_sparsity=0.0))


@dataclass
class FinetuneSpec:
    """Picklable (Ray ships it to every worker). `work_dir` is this run's own folder:
    `<run>/finetune/<task>/teacher` or `<run>/finetune/<task>/seed-<seed>`."""

    task: TaskConfig
    role: Role
    work_dir: str
    data_dir: str  # prepared features, examples and tokenizer of the task (shared by its runs)
    init_model: str  # folder (or hub name) of the model to start from
    train: TrainConfig  # max_steps, batch and LR already derived from the task
    seed: int
    teacher_dir: Optional[str] = None  # the task's fine-tuned dense teacher: distil from it
    lock_pattern: bool = True
    qat: bool = False  # 8-bit quantization-aware training (student only), int8 export beside the model
    distillation: DistillationConfig = field(default_factory=DistillationConfig)
    tracker: Any = field(default_factory=NullTracker)
    progress: bool = True
    resource_wait_s: float = 0.0  # wait this long for the cluster to hold the workers (ray.resource_wait_s)
    fault: Optional[FaultInjection] = None
    store: Optional[RunStore] = None  # set when the run directory lives on an object store (paths are its mirror)

    def __post_init__(self) -> None:
        if self.role not in ("teacher", "student"):
            raise ValueError(f"role={self.role!r}: expected 'teacher' or 'student'")
        if not isinstance(self.tracker, Tracker):
            raise ValueError(f"tracker={self.tracker!r} does not implement workers.tracking.Tracker")

    @property
    def stage(self) -> str:
        return f"finetune/{self.task.name}/{os.path.basename(self.work_dir)}"

    @property
    def pruning(self) -> Optional[PruningConfig]:
        return lock_config() if self.lock_pattern and self.role == "student" else None

    @property
    def stage_dir(self) -> str:
        return self.work_dir

    @property
    def checkpoint_dir(self) -> str:
        return os.path.join(self.work_dir, "checkpoints")

    @property
    def model_dir(self) -> str:
        return os.path.join(self.work_dir, "model")

    @property
    def metrics_path(self) -> str:
        return os.path.join(self.work_dir, "metrics.jsonl")

    @property
    def summary_path(self) -> str:
        return os.path.join(self.work_dir, "train_summary.json")

    @property
    def input_paths(self) -> list[str]:
        """What the workers read: pulled to each node's mirror when the run directory is remote."""
        return [self.data_dir, self.init_model, self.teacher_dir or ""]

    @property
    def ray_storage_path(self) -> str:
        return os.path.join(self.work_dir, "ray")

    @property
    def ray_run_name(self) -> str:
        return f"pofa-finetune-{self.task.name}-{os.path.basename(self.work_dir)}"

    @property
    def tokenizer_dir(self) -> str:
        return os.path.join(self.data_dir, "tokenizer")

    @property
    def seed_value(self) -> int:
        return self.seed
