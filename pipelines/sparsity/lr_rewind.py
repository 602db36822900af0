"""Learning-rate rewinding (`--lr_rewind` in Intel's Prune OFA scripts).

The spec is the reference's code, `model_compression_research/api_utils.py:
get_linear_rewinding_schedule_with_warmup`, called by `examples/transformers/language-modeling/run_mlm.py`
with `prune_start_step = policy_begin_step`, `prune_end_step = policy_end_step` and `rewind_interval =
pruning_frequency`. With W warm-up steps, N training steps and the window [a, b):

    outside = N - (b - a)                       steps on which the decay advances
    step < W            : step / W
    a <= step < b       : (outside - step + rewind) / (outside - W),  rewind = (step - a) // f * f
    otherwise           : (N - skipped - step) / (outside - W),        skipped = b - a before a, else 0

floored at 0 and *not* clamped at 1: at a rewind just after warm-up the multiplier exceeds 1 (BERT-Base:
50000 / 49000 = 1.0204 at step 1000). Inside the window the LR is rewound at every mask update; after it
the LR decays linearly to 0 at the last step. For the BERT-Base recipe (N = 100k, W = 1k, policy 0..50k,
f = 1k) the multiplier is 0.408 at step 80k.

`pruning.lr_rewind_window: pruning` rewinds over begin/end_pruning_step instead and `lr_rewind_clamp`
caps the multiplier at 1 (pofa before 0.2). Pure function of the step, so it resumes exactly.
"""
from __future__ import annotations

from typing import Callable

from .config import PruningConfig, ScheduleConfig


def rewinding_lr_multiplier(step: int, num_warmup_steps: int, num_training_steps: int,
                            prune_start_step: int, prune_end_step: int, rewind_interval: int,
                            clamp: bool = False) -> float:
    window = prune_end_step - prune_start_step
    outside = num_training_steps - window
    span = float(max(1, outside - num_warmup_steps))
    if step < num_warmup_steps:
        return step / float(max(1, num_warmup_steps))
    if prune_start_step <= step < prune_end_step:
        rewind = (step - prune_start_step) // rewind_interval * rewind_interval
        value = max(0.0, (outside - step + rewind) / span)
    else:
        skipped = window if step < prune_start_step else 0
        value = max(0.0, (num_training_steps - skipped - step) / span)
    return min(1.0, value) if clamp else value


def rewind_window(pruning: PruningConfig) -> tuple[int, int]:
    """[start, end) of the rewinding window; (0, 0) (plain linear decay) where nothing is rewound."""
    sched: ScheduleConfig = pruning.schedule
    if not pruning.lr_rewind or sched.kind == "constant":
        return 0, 0
    if pruning.lr_rewind_window == "policy":
        # only the cubic schedule has a policy window (the reference's one-shot config has none)
        return (sched.policy_begin_step, sched.policy_end_step) if sched.kind == "cubic" else (0, 0)
    if sched.end_pruning_step == -1:  # masks never stop changing: nothing to rewind against
        return 0, 0
    return sched.begin_pruning_step, sched.end_pruning_step


def make_lr_lambda(pruning: PruningConfig, num_warmup_steps: int, num_training_steps: int) -> Callable[[int], float]:
    """LR multiplier (`torch.optim.lr_scheduler.LambdaLR` style) for the recipe's rewinding options."""
    start, end = rewind_window(pruning)
    interval, clamp = pruning.schedule.pruning_frequency, pruning.lr_rewind_clamp

    def multiplier(step: int) -> float:
        return rewinding_lr_multiplier(step, num_warmup_steps, num_training_steps, start, end, interval, clamp)

    return multiplier
