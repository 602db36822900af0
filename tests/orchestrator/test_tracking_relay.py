"""Workers' records reach the driver's trackers completely before a stage's model is logged.

A model links the run's metrics at its step when it is logged (MLflow), so every record a worker sent
must be dispatched by then: the worker's `flush` waits until the inbox holds its records, and `settle`
waits for a batch the relay's own thread has taken but not yet handed over.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Mapping

import pytest

from orchestrator.tracking.relay import TrackingRelay

pytestmark = pytest.mark.integration


class SlowTracker:
    """A session tracker that takes its time per record, as a buffered MLflow tracker under load may."""

    def __init__(self) -> None:
        self.metrics: list[tuple[int, dict[str, float]]] = []
        self.lock = threading.Lock()

    def log_metrics(self, metrics: Mapping[str, float], step: int, timestamp_ms: int | None = None) -> None:
        time.sleep(0.002)
        with self.lock:
            self.metrics.append((step, dict(metrics)))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        pass

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        pass


def _send(tracker: Any, n: int) -> int:
    for step in range(n):
        tracker.log_metrics({"eval/accuracy": step / n}, step)
    tracker.flush()
    return n


def test_every_record_a_worker_flushed_is_dispatched_when_settle_returns(ray_local):
    ray = ray_local
    sink = SlowTracker()
    relay = TrackingRelay(lambda key: sink, poll_s=0.01)  # its thread drains all the while
    try:
        n = 3000  # more than one batch: the thread holds one while settle runs
        remote_send = ray.remote(num_cpus=0)(_send)
        assert ray.get(remote_send.remote(relay.tracker("finetune/polarity/seed-42"), n), timeout=120) == n
        relay.settle("finetune/polarity/seed-42")
        with sink.lock:
            steps = [step for step, _ in sink.metrics]
        assert steps == list(range(n))  # all of them, in the order sent
    finally:
        relay.close()


def test_a_flush_to_an_inbox_that_does_not_answer_gives_up_at_its_limit(ray_local, caplog):
    ray = ray_local
    from orchestrator.tracking.relay import RelayTracker

    @ray.remote(num_cpus=0)
    class Stuck:
        def put(self, item: tuple) -> None:
            pass

        def held(self) -> int:
            time.sleep(30)
            return 0

    tracker = RelayTracker(Stuck.remote(), "student")
    started = time.monotonic()
    with caplog.at_level("WARNING", logger="pofa.tracking"):
        tracker.flush(timeout_s=1.0)
    assert time.monotonic() - started < 10
    assert "records of student not confirmed in 1 s" in caplog.text
