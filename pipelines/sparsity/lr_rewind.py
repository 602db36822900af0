"""Learning-rate rewinding (`--lr_rewind` in Intel's Prune OFA scripts).

Linear warm-up then linear decay, where the decay does not advance while masks are being
recomputed: inside the pruning window the LR is rewound at every mask update to the value it had
when pruning began, and when pruning ends the decay restarts from there and runs to zero at the
last step. Before pruning starts the decay runs over the steps outside the pruning window.
Pure function of the step, so it resumes exactly; `make_lr_lambda` plugs into `LambdaLR` (or a
DeepSpeed client scheduler built from it).
"""
from __future__ import annotations

from typing import Callable

from .config import ScheduleConfig


def rewinding_lr_multiplier(step: int, num_warmup_steps: int, num_training_steps: int,
                            prune_start_step: int, prune_end_step: int, rewind_interval: int) -> float:
    window = prune_end_step - prune_start_step
    outside = num_training_steps - window  # steps on which the decay advances
    decay_span = float(max(1, outside - num_warmup_steps))
    if step < num_warmup_steps:
        return step / float(max(1, num_warmup_steps))
    if prune_start_step <= step < prune_end_step:
        rewound_to = step - (step - prune_start_step) // rewind_interval * rewind_interval
        return min(1.0, max(0.0, (outside - rewound_to) / decay_span))
    skipped = window if step < prune_start_step else 0
    return min(1.0, max(0.0, (num_training_steps - skipped - step) / decay_span))


def make_lr_lambda(schedule: ScheduleConfig, num_warmup_steps: int, num_training_steps: int,
                   lr_rewind: bool = True) -> Callable[[int], float]:
    """LR multiplier for `torch.optim.lr_scheduler.LambdaLR`; plain linear warm-up/decay when
    `lr_rewind` is off or masks never stop changing (end_pruning_step == -1)."""
    end = schedule.end_pruning_step
    if not lr_rewind or end == -1 or schedule.kind == "constant":
        start = end = 0
    else:
        start = schedule.begin_pruning_step
    interval = schedule.pruning_frequency

    def multiplier(step: int) -> float:
        return rewinding_lr_multiplier(step, num_warmup_steps, num_training_steps, start, end, interval)

    return multiplier
