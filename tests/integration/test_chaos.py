"""Chaos, seeded: three faults (one of each kind, one at each kind of moment: worker start-up, a
training step, a checkpoint being written) injected into a short `pofa run tiny`, rerun until done.
The finished run must be bit-identical to an uninterrupted one (exported weights, hence masks, and
every step's loss), leave no process of any of its Ray instances alive, and keep no more checkpoints
than `keep_checkpoints`. The harness is tests/chaos.py; `make bench-chaos` is the longer soak."""
from __future__ import annotations

import time

import pytest

from orchestrator.ray_leftovers import instance_processes
from tests.chaos import KINDS, Size, committed_checkpoints, differences, run_clean, run_with_faults, schedule

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SEED = 7


@pytest.mark.timeout(2400)  # two pofa runs and four reruns: 8 minutes at a load of 10, more on a busier machine
def test_random_faults_end_in_the_uninterrupted_result(tmp_path) -> None:
    size = Size()
    faults = schedule(SEED, 3, size)
    assert {f.kind for f in faults} == set(KINDS) and schedule(SEED, 3, size) == faults  # seeded: repeatable
    reference = tmp_path / "reference"
    run_clean(reference, size)

    chaos = run_with_faults(tmp_path / "chaos", size, faults)
    fired = [o for o in chaos.outcomes if o.fired]
    assert len(fired) >= 2, [(o.fault.describe(), o.fired) for o in chaos.outcomes]
    assert differences(reference, chaos.run_dir) == []
    for stage in ("teacher", "student"):
        assert len(committed_checkpoints(chaos.run_dir, stage)) <= 2
    time.sleep(3)  # the last run's own Ray shuts down as its driver exits
    assert chaos.tokens and all(instance_processes(t) == [] for t in chaos.tokens)
