"""Learning-rate schedule as a pure function of the optimizer step.

A pure function of (step, settings) cannot drift on resume: the trainer sets the LR from it
before every optimizer update instead of relying on a scheduler object's saved state.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

from pipelines.sparsity.config import PruningConfig
from pipelines.sparsity.lr_rewind import make_lr_lambda
from pipelines.training.config import TrainConfig


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    return math.ceil(total_steps * warmup_ratio)


def linear_lr(step: int, *, base_lr: float, total_steps: int, warmup_ratio: float) -> float:
    """Linear warm-up to `base_lr`, then linear decay to 0 at `total_steps` (HF 'linear').

    `step` = optimizer updates done so far: the value is the LR of the next update.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    step = max(step, 0)
    warm = warmup_steps(total_steps, warmup_ratio)
    if step < warm:
        return base_lr * step / max(1, warm)
    return base_lr * max(0.0, (total_steps - step) / max(1, total_steps - warm))


def make_lr_fn(cfg: TrainConfig, pruning: Optional[PruningConfig] = None) -> Callable[[int], float]:
    """step -> LR. With pruning and `pruning.lr_rewind`, the sparsity core's rewinding multiplier."""
    if pruning is not None and pruning.lr_rewind:
        multiplier = make_lr_lambda(pruning, warmup_steps(cfg.max_steps, cfg.warmup_ratio), cfg.max_steps)
        return lambda step: cfg.learning_rate * multiplier(step)
    return lambda step: linear_lr(step, base_lr=cfg.learning_rate, total_steps=cfg.max_steps,
                                  warmup_ratio=cfg.warmup_ratio)
