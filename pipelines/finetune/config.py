"""Typed recipe section for downstream fine-tuning (`finetune:` in a recipe).

One entry of `finetune.tasks` per downstream task. The student (or any sparse model, `finetune.model`)
is fine-tuned with its zero pattern locked, optionally distilling from a dense teacher that the same
stage first fine-tunes on the task. Task lengths are in epochs (the papers' unit); the number of
optimizer steps is derived once the task's training features are counted.
"""
from __future__ import annotations

import os
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipelines.config_keys import operational
from pipelines.data.paths import resolve_source_path
from pipelines.distillation_config import DistillationConfig
from pipelines.training.config import ScaleConfig, TrainConfig

TASK_NAMES = ("squad", "mnli", "qqp", "qnli", "sst2", "polarity")


class TaskData(BaseModel):
    """Where a task's examples come from. Default (all None): the task's Hugging Face dataset
    (`squad`, `glue/mnli`, ...). `dataset`: another hub name or a local `save_to_disk` / data
    folder. `files`: split -> local JSON Lines / CSV / Parquet file in the task's schema.
    `path` + `holdout_fraction`: one labelled file split into train / validation by `split_seed`
    (the offline `polarity` task reads `pkg://gensim/test/test_data/pang_lee_polarity.cor`)."""

    model_config = ConfigDict(extra="forbid")

    dataset: Optional[str] = None
    files: Optional[dict[str, str]] = None
    path: Optional[str] = None
    holdout_fraction: float = Field(default=0.2, gt=0, lt=1)
    split_seed: int = 0
    max_train_examples: Optional[int] = Field(default=None, ge=1)  # for quick runs; counted in the manifest
    max_eval_examples: Optional[int] = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _one_source(self) -> "TaskData":
        given = [k for k in ("dataset", "files", "path") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"finetune.tasks[].data: {' and '.join(given)} are exclusive: pick one")
        # local files must exist now, before any cluster work (hub names are checked when loaded)
        named = {f"files.{k}": v for k, v in (self.files or {}).items()}
        if self.path is not None:
            named["path"] = self.path
        for key, value in named.items():
            if not os.path.exists(resolve_source_path(value)):
                raise ValueError(f"finetune.tasks[].data.{key}={value!r} does not exist")
        return self


class TaskConfig(BaseModel):
    """One downstream task: data, sequence geometry and the hyperparameters that vary by task."""

    model_config = ConfigDict(extra="forbid")

    name: Literal["squad", "mnli", "qqp", "qnli", "sst2", "polarity"]
    data: TaskData = TaskData()
    max_seq_length: int = Field(default=128, ge=8)
    doc_stride: int = Field(default=128, ge=1)  # QA windows overlap by this many tokens
    max_query_length: int = Field(default=64, ge=1)
    max_answer_length: int = Field(default=30, ge=1)
    n_best_size: int = Field(default=20, ge=1)
    epochs: float = Field(default=3.0, gt=0)
    learning_rate: float = Field(default=5e-5, gt=0)
    global_batch_size: int = Field(default=32, ge=1)
    micro_batch_size: int = operational(16, ge=1)  # how the global batch is accumulated, not what it is
    warmup_ratio: float = Field(default=0.0, ge=0, lt=1)
    weight_decay: float = Field(default=0.01, ge=0)
    # A teacher already fine-tuned on this task (hub name or folder): used as is, no teacher run
    # (Intel's examples distil from public fine-tunes such as csarron/bert-base-uncased-squad-v1).
    teacher: Optional[str] = None
    # The dense teacher's own fine-tuning; None: the student's values.
    teacher_epochs: Optional[float] = Field(default=None, gt=0)
    teacher_learning_rate: Optional[float] = Field(default=None, gt=0)
    eval_every_epochs: float = operational(1.0, gt=0)

    @model_validator(mode="after")
    def _geometry(self) -> "TaskConfig":
        if self.name == "squad" and self.doc_stride >= self.max_seq_length - self.max_query_length - 3:
            raise ValueError(f"finetune.tasks[{self.name}].doc_stride={self.doc_stride} leaves no room in "
                             f"max_seq_length={self.max_seq_length} after the question "
                             f"(max_query_length={self.max_query_length})")
        return self


class FinetuneTrainConfig(ScaleConfig):
    """How every fine-tuning run executes: scale, DeepSpeed, optimizer details, checkpoints. Batch,
    learning rate, warm-up and length are per task (`finetune.tasks[]`)."""
    adam_beta1: float = Field(default=0.9, gt=0, lt=1)
    adam_beta2: float = Field(default=0.999, gt=0, lt=1)
    adam_epsilon: float = Field(default=1e-8, gt=0)
    max_grad_norm: float = Field(default=1.0, ge=0)
    checkpoint_every: int = operational(500, ge=1)  # optimizer steps
    keep_checkpoints: int = operational(1, ge=1)
    max_failures: int = operational(3, ge=-1)  # failed attempts in a row without a new checkpoint
    retry_backoff_s: float = operational(10.0, ge=0)

    def for_task(self, **task_values: object) -> TrainConfig:
        """A full TrainConfig for one run (validated: batch divisibility, fp16 needs GPUs)."""
        return TrainConfig.model_validate({**self.model_dump(), **task_values})


class FinetuneConfig(BaseModel):
    """The `finetune:` section of a recipe."""

    model_config = ConfigDict(extra="forbid")

    tasks: list[TaskConfig] = Field(min_length=1)
    # The sparse model to fine-tune: null = this run's student export; else a hub name or local folder.
    model: Optional[str] = None
    # Dense model the task teacher starts from: null = this run's teacher export; else hub name / folder.
    teacher_model: Optional[str] = None
    distill: bool = True  # fine-tune a dense teacher per task first and distil from it
    distillation: DistillationConfig = DistillationConfig()
    seeds: list[int] = Field(default_factory=lambda: [42, 43], min_length=1)
    lock_pattern: bool = True  # pruned weights stay exactly zero (the method); False only for dense baselines
    qat: bool = False  # quantization-aware training to 8 bits on the locked sparse model
    # Scale, DeepSpeed and checkpoint settings shared by every task (batch/LR/length come from the task).
    train: FinetuneTrainConfig = FinetuneTrainConfig()
    # Runs (task teachers, seeds) that may train at the same time, each on its own workers; None: as
    # many as the cluster holds. Concurrency never changes a result.
    max_concurrent_runs: Optional[int] = operational(None, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> "FinetuneConfig":
        names = [t.name for t in self.tasks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"finetune.tasks: {', '.join(dup)} listed twice")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"finetune.seeds={self.seeds} repeats a seed")
        for t in self.tasks:
            per_step = self.train.num_workers * t.micro_batch_size
            if t.global_batch_size % per_step:
                raise ValueError(f"finetune.tasks[{t.name}].global_batch_size={t.global_batch_size} is not divisible "
                                 f"by finetune.train.num_workers={self.train.num_workers} x micro_batch_size="
                                 f"{t.micro_batch_size}")
        if self.train.precision == "fp16" and self.train.gpus_per_worker == 0:
            raise ValueError("finetune.train.precision='fp16' needs GPUs (gpus_per_worker > 0)")
        return self

    def task(self, name: str) -> TaskConfig:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(name)
