"""Typed recipe section for a training stage (`teacher.train:` / `student.train:` in a recipe)."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipelines.config_keys import operational


class ScaleConfig(BaseModel):
    """Where and how a training run executes: Ray Train workers and DeepSpeed settings."""

    model_config = ConfigDict(extra="forbid")

    # Scale (Ray Train ScalingConfig): operational, the global batch stays the recipe's whatever they are.
    num_workers: int = operational(2, ge=1)
    cpus_per_worker: float = operational(1.0, gt=0)
    gpus_per_worker: float = operational(0.0, ge=0)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD", "STRICT_PACK"] = operational("PACK")
    # DeepSpeed. ZeRO shards the same optimisation differently; precision changes the numbers.
    zero_stage: int = operational(2, ge=0, le=3)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"


class TrainConfig(ScaleConfig):
    """How one stage trains: scale, DeepSpeed settings, batch, schedule, evaluation, checkpoints.

    The global batch is fixed by the recipe; gradient accumulation is derived from it so a run
    means the same thing on 2 workers or 64.
    """
    # Batch: the global batch defines the run; the micro-batch only how it is accumulated.
    global_batch_size: int = Field(default=256, ge=1)
    micro_batch_size: int = operational(32, ge=1)
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
    # Evaluation, checkpoints (in optimizer steps) and the failure policy: operational.
    eval_every: int = operational(500, ge=1)
    eval_batches: int = operational(20, ge=1)
    checkpoint_every: int = operational(500, ge=1)
    keep_checkpoints: int = operational(2, ge=1)
    # Failed attempts in a row without a new checkpoint before the stage gives up (-1: never); each
    # retry waits retry_backoff_s, doubling up to 300 s. A new checkpoint resets the count.
    max_failures: int = operational(3, ge=-1)
    retry_backoff_s: float = operational(10.0, ge=0)
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
