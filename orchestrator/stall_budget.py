"""`ray.stall_timeout_s` against the start-ups this run has measured, before any cluster work.

A stall limit shorter than a worker's start-up (model, DeepSpeed engine, checkpoint load: the phase
with the fewest signs of progress) would stop every attempt while it starts, over and over. Each
training attempt records its start-up (`startup_s` in its `attempts.jsonl`); a rerun whose limit is
below the longest of them is refused with the figure and where it was measured.
"""
from __future__ import annotations

import os
from typing import Iterable, Optional

from orchestrator.stages import STAGES
from workers.run_layout import RunLayout
from workers.run_records import AttemptRecord, read_record_lines


class StallBudgetError(ValueError):
    """The recipe's stall limit is shorter than a start-up measured in this run."""


def longest_startup(layout: RunLayout, stages: Iterable[str]) -> Optional[tuple[float, str]]:
    """(seconds, attempts file) of the longest start-up recorded by the given stages' training runs."""
    found: list[tuple[float, str]] = []
    for path, stage in _attempt_files(layout, stages):
        for record in read_record_lines(AttemptRecord, path, stage, repair=False):
            if record.startup_s is not None:  # absent from attempts made before start-ups were measured
                found.append((record.startup_s, path))
    return max(found) if found else None


def check_stall_budget(stall_timeout_s: float, layout: RunLayout, stages: Iterable[str]) -> None:
    measured = longest_startup(layout, stages)
    if measured is not None and stall_timeout_s <= measured[0]:
        seconds, path = measured
        raise StallBudgetError(
            f"ray.stall_timeout_s={stall_timeout_s:g} is shorter than a start-up this run measured: {seconds:.0f} s "
            f"(in {path}); the stall watchdog would stop every attempt while its workers start. Set "
            f"ray.stall_timeout_s above it (e.g. --set ray.stall_timeout_s={max(60, int(seconds * 3))}); "
            "nothing was started")


def _attempt_files(layout: RunLayout, stages: Iterable[str]) -> list[tuple[str, str]]:
    """(attempts file, its stage) of every training run of `stages` that has one (the stage says which)."""
    return [(f, stage) for stage in stages for f in STAGES[stage].attempt_files(layout) if os.path.exists(f)]
