"""Typed recipe section for a training stage (`teacher.train:` / `student.train:` in a recipe)."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ScaleConfig(BaseModel):
    """Where and how a training run executes: Ray Train workers and DeepSpeed settings."""

    model_config = ConfigDict(extra="forbid")

    # Scale (Ray Train ScalingConfig).
    num_workers: int = Field(default=2, ge=1)
    cpus_per_worker: float = Field(default=1.0, gt=0)
    gpus_per_worker: float = Field(default=0.0, ge=0)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD", "STRICT_PACK"] = "PACK"
    # DeepSpeed.
    zero_stage: int = Field(default=2, ge=0, le=3)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"


class TrainConfig(ScaleConfig):
    """How one stage trains: scale, DeepSpeed settings, batch, schedule, evaluation, checkpoints.

    The global batch is fixed by the recipe; gradient accumulation is derived from it so a run
    means the same thing on 2 workers or 64.
    """
    # Batch.
    global_batch_size: int = Field(default=256, ge=1)
    micro_batch_size: int = Field(default=32, ge=1)
    # Schedule and optimizer (AdamW; BERT defaults).
    max_steps: int = Field(default=1000, ge=1)
    learning_rate: float = Field(default=5e-5, gt=0)
    warmup_ratio: float = Field(default=0.01, ge=0, lt=1)
    weight_decay: float = Field(default=0.01, ge=0)
    lr_schedule: Literal["linear"] = "linear"
    adam_beta1: float = Field(default=0.9, gt=0, lt=1)
    adam_beta2: float = Field(default=0.999, gt=0, lt=1)
    adam_epsilon: float = Field(default=1e-6, gt=0)
    max_grad_norm: float = Field(default=1.0, ge=0)  # 0 disables clipping
    # Evaluation and checkpoints (in optimizer steps).
    eval_every: int = Field(default=500, ge=1)
    eval_batches: int = Field(default=20, ge=1)
    checkpoint_every: int = Field(default=500, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1)
    max_failures: int = Field(default=1, ge=-1)
    # None: use the run's seed.
    seed: Optional[int] = None

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        per_step = self.num_workers * self.micro_batch_size
        if self.global_batch_size % per_step:
            raise ValueError(
                f"global_batch_size={self.global_batch_size} is not divisible by num_workers={self.num_workers}"
                f" x micro_batch_size={self.micro_batch_size} (= {per_step}); gradient accumulation must be"
                " a whole number of micro-batches")
        if self.precision == "fp16" and self.gpus_per_worker == 0:
            raise ValueError("precision='fp16' needs GPUs (gpus_per_worker > 0); use fp32 or bf16 on CPU")
        return self

    @property
    def grad_accum_steps(self) -> int:
        return self.global_batch_size // (self.num_workers * self.micro_batch_size)

    @property
    def samples_per_rank_per_step(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps

    def resolved_seed(self, run_seed: int) -> int:
        return run_seed if self.seed is None else self.seed
