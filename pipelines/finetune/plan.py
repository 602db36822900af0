"""From a task's epochs and batch to the optimizer-step geometry of one fine-tuning run."""
from __future__ import annotations

import math
from typing import Literal

from pipelines.finetune.config import FinetuneTrainConfig, TaskConfig
from pipelines.training.config import TrainConfig


def steps_per_epoch(task: TaskConfig, train_features: int, num_workers: int) -> int:
    """Optimizer steps in one pass over the features; each worker owns an equal share and drops
    its share's short tail (as the training data cursor does)."""
    per_rank = train_features // num_workers
    per_rank_step = task.global_batch_size // num_workers
    steps = per_rank // per_rank_step
    if steps == 0:
        raise ValueError(f"finetune.tasks[{task.name}]: {train_features} training features are fewer than one "
                         f"global batch ({task.global_batch_size}) over {num_workers} workers")
    return steps


def task_train_config(base: FinetuneTrainConfig, task: TaskConfig, train_features: int,
                      role: Literal["teacher", "student"]) -> TrainConfig:
    """The shared `finetune.train` settings with this task's batch, LR, warm-up and length filled in."""
    per_epoch = steps_per_epoch(task, train_features, base.num_workers)
    epochs = task.teacher_epochs if role == "teacher" and task.teacher_epochs else task.epochs
    lr = task.teacher_learning_rate if role == "teacher" and task.teacher_learning_rate else task.learning_rate
    max_steps = max(1, math.ceil(per_epoch * epochs))
    eval_every = max(1, math.ceil(per_epoch * task.eval_every_epochs))
    return base.for_task(global_batch_size=task.global_batch_size, micro_batch_size=task.micro_batch_size,
                         learning_rate=lr, warmup_ratio=task.warmup_ratio, weight_decay=task.weight_decay,
                         max_steps=max_steps, eval_every=eval_every,
                         checkpoint_every=min(base.checkpoint_every, max_steps))
