"""Pruning schedules: pure functions of the optimizer step.

`step` counts completed optimizer updates (0 before the first update), not micro-batches: with
gradient accumulation the loop must pass the optimizer-step counter, or the target is missed.

- cubic (Zhu & Gupta), reference semantics, t0 = policy_begin_step, t1 = policy_end_step:
      base(t) = min(max((1 - (t - t0) / (t1 - t0)) ** 3, 0), 1)
      s(t)    = s_initial + (s_final - s_initial) * (1 - base(t))
  masks are recomputed at steps t with begin_pruning_step <= t <= end_pruning_step (-1: no end)
  and (t - begin_pruning_step) % pruning_frequency == 0.
- one_shot: one mask computation at begin_pruning_step, straight to final_sparsity.
- constant (pattern lock): the zero pattern found in the weights when training starts is kept;
  masks are never recomputed. `target_sparsity` reports final_sparsity (the expected level).
"""
from __future__ import annotations

from .config import ScheduleConfig

CUBIC_EXPONENT = 3


def cubic_sparsity(cfg: ScheduleConfig, step: int) -> float:
    t0, t1 = cfg.policy_begin_step, cfg.policy_end_step
    base = min(max((1.0 - (step - t0) / (t1 - t0)) ** CUBIC_EXPONENT, 0.0), 1.0)
    return cfg.initial_sparsity + (cfg.final_sparsity - cfg.initial_sparsity) * (1.0 - base)


def target_sparsity(cfg: ScheduleConfig, step: int) -> float:
    """Sparsity a mask computed at `step` should have."""
    if cfg.kind == "cubic":
        return cubic_sparsity(cfg, step)
    if cfg.kind == "one_shot":
        return cfg.final_sparsity if step >= cfg.begin_pruning_step else cfg.initial_sparsity
    return cfg.final_sparsity


def in_pruning_window(cfg: ScheduleConfig, step: int) -> bool:
    return step >= cfg.begin_pruning_step and (cfg.end_pruning_step == -1 or step <= cfg.end_pruning_step)


def is_mask_update_step(cfg: ScheduleConfig, step: int) -> bool:
    """Whether masks are recomputed (from weight magnitudes) at `step`."""
    if cfg.kind == "constant":
        return False
    if cfg.kind == "one_shot":
        return step == cfg.begin_pruning_step
    return in_pruning_window(cfg, step) and (step - cfg.begin_pruning_step) % cfg.pruning_frequency == 0


def last_mask_update_step(cfg: ScheduleConfig) -> int | None:
    """The last step at which masks change, or None when they may change until the end."""
    if cfg.kind == "constant":
        return None
    if cfg.kind == "one_shot":
        return cfg.begin_pruning_step
    if cfg.end_pruning_step == -1:
        return None
    span = cfg.end_pruning_step - cfg.begin_pruning_step
    return cfg.begin_pruning_step + span - span % cfg.pruning_frequency


def first_final_update(cfg: ScheduleConfig) -> int | None:
    """The first cubic mask update at or after policy_end_step (the one at the final sparsity), or
    None when masks stop changing before it."""
    t1, begin, f = cfg.policy_end_step, cfg.begin_pruning_step, cfg.pruning_frequency
    step = max(t1, begin)
    step += (-(step - begin)) % f
    if cfg.end_pruning_step != -1 and step > cfg.end_pruning_step:
        return None
    return step
