"""What one fine-tuning run (a task's dense teacher, or one seed of the sparse student) needs."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from pipelines.distillation_config import DistillationConfig
from pipelines.finetune.config import TaskConfig
from pipelines.sparsity.config import PruningConfig, ScheduleConfig
from pipelines.training.config import TrainConfig
from workers.run_layout import RunLayout, TaskDataLayout, TrainRunLayout
from workers.tracking import NullTracker
from workers.train.spec import FaultInjection, check_tracker

Role = Literal["teacher", "student"]


def lock_config() -> PruningConfig:
    """The pattern lock: masks taken from the zeros the weights have when training starts, never
    recomputed (the sparsity core's constant schedule). Heads stay dense (default excludes)."""
    return PruningConfig(schedule=ScheduleConfig(kind="constant", final_sparsity=0.0))


@dataclass
class FinetuneSpec:
    """Picklable (Ray ships it to every worker). `run_name`: "teacher" or "seed-<s>", the run's
    folder under the task's (`layout.finetune_run`)."""

    task: TaskConfig
    role: Role
    layout: RunLayout
    run_name: str
    init_model: str  # folder (or hub name) of the model to start from
    train: TrainConfig  # max_steps, batch and LR already derived from the task
    seed: int
    teacher_dir: Optional[str] = None  # the task's fine-tuned dense teacher: distil from it
    lock_pattern: bool = True
    qat: bool = False  # 8-bit quantization-aware training (student only), int8 export beside the model
    distillation: DistillationConfig = field(default_factory=DistillationConfig)
    tracker: Any = field(default_factory=NullTracker)
    progress: bool = True
    log_dir: Optional[str] = None  # each worker's stdout/stderr go to <log_dir>/worker-<rank>.log
    resource_wait_s: float = 0.0  # wait this long for the cluster to hold the workers (ray.resource_wait_s)
    stall_timeout_s: float = 1800.0  # a worker without progress this long is stopped (ray.stall_timeout_s)
    fault: Optional[FaultInjection] = None
    resume_universal: bool = False
    elastic: bool = False  # a data cursor per worker: resumes on the same number of workers only

    def __post_init__(self) -> None:
        if self.role not in ("teacher", "student"):
            raise ValueError(f"role={self.role!r}: expected 'teacher' or 'student'")
        check_tracker(self.tracker)

    @property
    def run(self) -> TrainRunLayout:
        return self.layout.finetune_run(self.task.name, self.run_name)

    @property
    def data(self) -> TaskDataLayout:
        return self.layout.task_data(self.task.name)

    @property
    def pruning(self) -> Optional[PruningConfig]:
        return lock_config() if self.lock_pattern and self.role == "student" else None

    @property
    def input_paths(self) -> list[str]:
        """What the workers read from the run directory (pulled to each node's copy first); models
        named by hub name or by a folder outside the run are read where they are."""
        candidates = [self.data.root, self.init_model, self.teacher_dir or ""]
        return [p for p in candidates if p and self.layout.contains(p)]

    @property
    def seed_value(self) -> int:
        return self.seed
