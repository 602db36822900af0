"""The one retry policy of tracking calls (orchestrator/tracking/retry.py), with fake calls and sleeps."""
from __future__ import annotations

import atexit
import logging
import time
from typing import Any

import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import PERMISSION_DENIED

from orchestrator.tracking import AsyncMlflowTracker, SenderSettings, TrackingUnreachableError
from orchestrator.tracking.retry import is_transient, retry_transient

URI = "http://mlflow.example:5000"


class FlakyCall:
    """Raises `error` on the first `failures` calls, then returns "done"."""

    def __init__(self, failures: int, error: BaseException) -> None:
        self.failures, self.error, self.calls = failures, error, 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return "done"


def test_a_transient_error_is_retried_with_backoff_then_succeeds(caplog):
    call, sleeps = FlakyCall(8, ConnectionRefusedError("connection refused")), []
    with caplog.at_level(logging.WARNING, logger="pofa.tracking"):
        result = retry_transient(call, what="create the parent run", uri=URI, initial_s=1.0, max_s=30.0,
                                 give_up_after_s=1000.0, sleep=sleeps.append)
    assert (result, call.calls) == ("done", 9)
    assert sleeps == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]  # doubling, capped at max_s
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == [f"pofa: MLflow at {URI} failed to create the parent run (connection refused); retrying"]


@pytest.mark.parametrize("error", [
    MlflowException("bad credentials", error_code=PERMISSION_DENIED),  # wrong credentials fail at once
    ValueError("a bug, not an outage"),
])
def test_a_non_transient_error_is_raised_at_once(error, caplog):
    call, sleeps = FlakyCall(1, error), []
    with caplog.at_level(logging.WARNING, logger="pofa.tracking"), pytest.raises(type(error)) as raised:
        retry_transient(call, what="tag stage 'teacher'", uri=URI, initial_s=1.0, max_s=30.0,
                        give_up_after_s=60.0, sleep=sleeps.append)
    assert raised.value is error
    assert (call.calls, sleeps, caplog.records) == (1, [], [])


def test_gives_up_before_a_wait_would_pass_the_boundary():
    call, sleeps = FlakyCall(100, OSError("unreachable")), []
    with pytest.raises(TrackingUnreachableError) as raised:
        retry_transient(call, what="mark stage 'teacher' FINISHED", uri=URI, initial_s=0.25, max_s=10.0,
                        give_up_after_s=0.9, sleep=sleeps.append)
    assert str(raised.value) == f"could not mark stage 'teacher' FINISHED in MLflow at {URI} within 0.9 s: unreachable"
    assert isinstance(raised.value.__cause__, OSError)
    assert sleeps == [0.25, 0.5]  # the next wait, 1 s, would end past 0.9 s
    assert call.calls == 3


def test_which_errors_are_transient():
    assert is_transient(ConnectionResetError())
    assert is_transient(MlflowException("busy"))  # INTERNAL_ERROR: a server having a bad moment
    assert is_transient(type("OperationalError", (Exception,), {})("database is locked"))  # SQLAlchemy's
    assert not is_transient(MlflowException("no", error_code=PERMISSION_DENIED))
    assert not is_transient(KeyboardInterrupt())


class FlakyClient:
    """Stands in for MlflowClient in the sender thread: refuses `failures` log_batch calls."""

    def __init__(self, failures: float) -> None:
        self.failures, self.calls, self.steps = failures, 0, []

    def log_batch(self, run_id: str, metrics: list[Any], tags: list[Any], synchronous: bool) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise ConnectionRefusedError("connection refused")
        self.steps += [m.step for m in metrics]


FAST = SenderSettings(flush_interval_s=0.05, retry_initial_s=0.01, retry_max_s=0.02)


def test_sender_keeps_records_through_an_outage_and_delivers_them_in_order(caplog):
    tracker = AsyncMlflowTracker(URI, "run0", FAST)
    tracker._client = client = FlakyClient(failures=5)
    with caplog.at_level(logging.WARNING, logger="pofa.tracking"):
        for step in range(3):
            tracker.log_metrics({"loss": 1.0 / (step + 1)}, step)
        deadline = time.monotonic() + 30
        while (tracker.pending or tracker.in_outage) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert tracker.close(timeout_s=5)
    assert client.steps == [0, 1, 2] and client.calls >= 6
    messages = [r.getMessage() for r in caplog.records]
    assert sum("is not answering" in m for m in messages) == 1  # one outage, one warning
    assert sum("is back after" in m for m in messages) == 1


def test_sender_close_gives_up_at_its_deadline_while_the_store_is_down():
    tracker = AsyncMlflowTracker(URI, "run0", SenderSettings(flush_interval_s=60, retry_initial_s=0.01,
                                                             retry_max_s=0.05))
    tracker._client = FlakyClient(failures=float("inf"))
    tracker.log_metrics({"loss": 1.0}, 0)
    started = time.monotonic()
    assert tracker.close(timeout_s=0.3) is False  # retried until close()'s deadline, then stopped
    assert 0.25 <= time.monotonic() - started < 5
    assert tracker.pending == 1
    atexit.unregister(tracker.close)  # the store stays "down": no second report at interpreter exit
