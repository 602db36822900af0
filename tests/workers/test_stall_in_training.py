"""The stall watchdog in a real training stage (Ray Train, 2 DeepSpeed workers on CPU): rank 1 blocks
forever on a lock at step 3; within stall_timeout_s + 1 minute both workers leave their stacks in the
attempt's log folder and are stopped, Ray Train restarts the group from checkpoint 2, and the stage
finishes with the losses of an uninterrupted run; the start-ups those attempts measured refuse a rerun
whose stall limit is below them. A worker that stalls on every attempt fails the
stage with an error naming the stall, where it was, and its stacks."""
from __future__ import annotations

import dataclasses
import os
import shutil
import time

import pytest

from orchestrator.stall_budget import StallBudgetError, check_stall_budget, longest_startup
from tests.workers.train_fixture import make_preprocess, make_teacher_export, read_losses, start_ray, student_spec
from workers import console_lines
from workers.stall_watchdog import StallError, read_records
from workers.train.driver import run_training
from workers.train.spec import FaultInjection

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STALL_S = 45.0  # above this machine's longest start-up phase under load, far below the default


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    start_ray()
    run_dir = str(tmp_path_factory.mktemp("stall"))
    make_preprocess(run_dir)
    make_teacher_export(run_dir)
    return run_dir


def _spec(run_dir: str, logs: str, fault: FaultInjection | None, **train):
    spec = student_spec(run_dir, fault=fault, **train)
    return dataclasses.replace(spec, log_dir=logs, stall_timeout_s=STALL_S)


def test_a_blocked_worker_is_stopped_with_its_stacks_and_the_stage_goes_on(base, tmp_path) -> None:
    reference = _spec(base, str(tmp_path / "ref-logs"), None, max_steps=4, checkpoint_every=1)
    run_training(reference, echo=False)
    ref_losses = read_losses(reference.run.metrics)

    run_dir = str(tmp_path / "run")
    for name in ("preprocess", "teacher"):  # the same inputs, a fresh student
        shutil.copytree(os.path.join(base, name), os.path.join(run_dir, name))
    logs = str(tmp_path / "logs")
    marker = str(tmp_path / "stalled")
    spec = _spec(run_dir, logs, FaultInjection(step=2, rank=1, marker=marker, kind="stall"),
                 max_steps=4, checkpoint_every=1, max_failures=2)
    said: list[str] = []
    undo = console_lines.install(said.append)
    try:
        result = run_training(spec, echo=False)
    finally:
        undo()

    assert result.final_step == 4 and result.start_steps == [0, 2]
    # the console heard of it once per stopped worker, while the stage went on
    stall_lines = [line for line in said if line.startswith("[student] stalled: ")]
    assert any("student worker-1" in line and "it was at" in line for line in stall_lines)
    assert len(stall_lines) == len(set(stall_lines)) == len(read_records(logs))
    records = read_records(logs)
    assert {r.name for r in records} >= {"student worker-1"}
    stalled = next(r for r in records if r.name == "student worker-1")
    assert stalled.last_progress == "step 3"
    assert "_check_fault" in stalled.where[-1] and "lock.acquire()" in stalled.where[-1]
    assert "in _check_fault" in open(stalled.stacks).read()
    hung_at = os.path.getmtime(marker)
    assert STALL_S <= stalled.time - hung_at <= STALL_S + 60
    losses = read_losses(spec.run.metrics)
    assert sorted(losses) == [1, 2, 3, 4]
    for step in (3, 4):  # trained after the restart, as the uninterrupted run did
        assert losses[step][-1] == pytest.approx(ref_losses[step][0], abs=1e-5)

    # the start-ups these attempts measured: a rerun with a stall limit below them is refused up front
    seconds, path = longest_startup(spec.layout, ["student"])
    assert 0 < seconds < STALL_S and path == spec.run.attempts
    check_stall_budget(seconds + 1, spec.layout, ["student"])
    with pytest.raises(StallBudgetError, match=r"ray.stall_timeout_s=.* is shorter than a start-up this run "
                                               r"measured: .*nothing was started"):
        check_stall_budget(seconds - 0.5, spec.layout, ["student", "finetune"])


def test_a_worker_that_stalls_every_attempt_fails_the_stage_naming_the_stall(base, tmp_path) -> None:
    run_dir = str(tmp_path / "run")
    for name in ("preprocess", "teacher"):
        shutil.copytree(os.path.join(base, name), os.path.join(run_dir, name))
    logs = str(tmp_path / "logs")
    fault = FaultInjection(step=0, rank=0, marker=str(tmp_path / "marker"), kind="stall", once=False)
    spec = _spec(run_dir, logs, fault, max_steps=2, checkpoint_every=1, max_failures=0)
    started = time.time()
    with pytest.raises(StallError) as err:
        run_training(spec, echo=False)
    assert time.time() - started < STALL_S + 60 + 120  # the stall limit, its minute, and a start-up
    text = str(err.value)
    assert "student worker-0" in text and "made no progress" in text and f"stall_timeout_s={STALL_S:g}" in text
    assert "_check_fault" in text and logs in text
