"""The recipe: one YAML document, one typed section per stage, validated before any cluster work."""
from __future__ import annotations

import re
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from orchestrator.tracking.config import TrackingConfig
from pipelines.config_keys import operational
from pipelines.data.config import PreprocessConfig
from pipelines.distillation_config import DistillationConfig
from pipelines.finetune.config import FinetuneConfig
from pipelines.inference.config import ReportConfig
from pipelines.models.config import ModelConfig
from pipelines.sparsity.config import PruningConfig
from pipelines.sparsity.schedules import first_final_update
from pipelines.training.config import TrainConfig


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class RayConfig(BaseModel):
    """Where the job graph runs. No address: a local Ray instance, dashboard on 127.0.0.1 only."""

    model_config = ConfigDict(extra="forbid")
    address: Optional[str] = None
    num_cpus: Optional[int] = Field(default=None, ge=1)
    dashboard_host: str = "127.0.0.1"
    # How long a training stage waits for the cluster to hold its workers (nodes still joining, an
    # autoscaler adding them); 0: fail at once when the resources are not there.
    resource_wait_s: float = Field(default=0.0, ge=0)
    # On SIGTERM (a pod eviction, a spot reclaim) a training stage checkpoints its current step and
    # stops within this many seconds; keep it below the pods' terminationGracePeriodSeconds.
    preemption_grace_s: float = Field(default=25.0, gt=0)
    # A training worker or preprocess processor with no progress (no step, no phase, no log line) for
    # this long records its stacks in the stage's log folder and is stopped, and the attempt is retried
    # (workers/stall_watchdog.py). The default covers the slowest honest phase measured so far (a
    # BERT-Large start-up on a busy node, a checkpoint to an object store) many times over; a rerun
    # refuses a value below a start-up this run has measured.
    stall_timeout_s: float = Field(default=1800.0, ge=10)


class StudentConfig(TrainConfig):
    """The student trains like the teacher, plus pruning and distillation from the frozen teacher."""

    pruning: PruningConfig = PruningConfig()
    distillation: DistillationConfig = DistillationConfig()

    def train_config(self) -> TrainConfig:
        return TrainConfig.model_validate(self.model_dump(exclude={"pruning", "distillation"}))

    @model_validator(mode="after")
    def _schedule_fits(self) -> "StudentConfig":
        sched = self.pruning.schedule
        if sched.kind == "cubic" and sched.policy_end_step > self.max_steps:
            raise ValueError(f"pruning.schedule.policy_end_step={sched.policy_end_step} is after max_steps="
                             f"{self.max_steps}: the target sparsity would never be reached")
        if sched.kind == "cubic":
            # the mask of schedule step t is computed after update t + 1 (the reference's timing), so the
            # first update at or after the policy's end must come before the last step
            final = first_final_update(sched)
            if final is not None and final + 1 >= self.max_steps:
                raise ValueError(f"pruning.schedule: the mask at the final sparsity (schedule step {final}) is computed "
                                 f"after update {final + 1}, not before max_steps={self.max_steps}: lower "
                                 "pruning.schedule.policy_end_step or raise max_steps")
        return self


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = operational("")
    seed: int = Field(default=42, ge=0, lt=2**31)
    run_dir: Optional[str] = operational(None)
    stages: list[str] = operational(["preprocess", "teacher", "student", "report"])
    ray: RayConfig = operational(RayConfig())
    preprocess: Optional[PreprocessConfig] = None
    model: Optional[ModelConfig] = None
    teacher: Optional[TrainConfig] = None
    student: Optional[StudentConfig] = None
    finetune: Optional[FinetuneConfig] = None
    # result-defining, but only the report stage reads it (changing it redoes the report alone)
    report: ReportConfig = ReportConfig()
    tracking: TrackingConfig = operational(TrackingConfig())

    @field_validator("stages")
    @classmethod
    def _known_stages(cls, stages: list[str]) -> list[str]:
        from orchestrator.stages import STAGES  # the registry imports this module: asked at validation time

        unknown = [s for s in stages if s not in STAGES]
        if unknown:
            raise ValueError(f"unknown stage(s) {', '.join(map(repr, unknown))} (known: {', '.join(STAGES)})")
        return stages

    @model_validator(mode="after")
    def _sections_for_stages(self) -> "Recipe":
        from orchestrator.stages import STAGES

        for stage in self.stages:
            for section in STAGES[stage].sections:
                if getattr(self, section) is None:
                    raise ValueError(f"{section}: required when stages include {stage!r}")
        return self

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        # The name becomes a folder under ./runs: it must never climb out of it.
        if not _NAME.match(v) or ".." in v:
            raise ValueError(f"{v!r} is not a safe run name (letters, digits, '.', '_', '-'; no '..')")
        return v
