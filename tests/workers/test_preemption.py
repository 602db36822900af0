"""Preemption notices without a cluster: what a training rank honours, and the driver's SIGTERM."""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from orchestrator.job_graph import check_grace
from workers import preemption


@pytest.fixture
def kv(monkeypatch) -> dict:
    """Ray's key-value store, as a dict."""
    store: dict = {}
    monkeypatch.setattr(preemption, "_kv_time", lambda key: store.get(key))
    monkeypatch.setattr(preemption, "_kv_put", lambda key: store.__setitem__(key, time.time()))
    return store


def test_a_rank_honours_its_run_and_fresh_notices_of_its_node_or_the_cluster(kv) -> None:
    preemption.request_node("node-a")  # given before this attempt started: for an earlier one
    time.sleep(0.01)
    watch = preemption.Watch("s3://bucket/run", "node-a", interval_s=0.0)
    other = preemption.Watch("s3://bucket/other-run", "node-b", interval_s=0.0)
    assert not watch.requested() and not other.requested()
    preemption.request_run("s3://bucket/run")
    assert watch.requested() and not other.requested()  # another run on the cluster goes on
    preemption.request_node("node-b")
    assert other.requested()
    late = preemption.Watch("s3://bucket/third", "node-c", interval_s=0.0)
    preemption.request_node("", whole_cluster=True)
    assert late.requested()


def test_the_drivers_sigterm_is_passed_on_during_training_and_raised_elsewhere() -> None:
    noticed = threading.Event()
    handler = preemption.DriverHandler(3600, noticed.set, lambda _: None)
    handler.install()
    try:
        with pytest.raises(preemption.Preempted, match="rerun the same command"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs in this (main) thread
        handler.noticed.clear()
        with preemption.graceful_stage():
            os.kill(os.getpid(), signal.SIGTERM)
            assert noticed.wait(5)  # the workers were told; nothing raised here
        assert preemption.driver_noticed() and preemption.run_must_stop(time.time())
    finally:
        handler.uninstall()  # and the grace timer is cancelled
    assert not preemption.driver_noticed()


def test_a_grace_period_the_pods_do_not_allow_is_refused(monkeypatch) -> None:
    check_grace(25)
    monkeypatch.setenv("POFA_TERMINATION_GRACE_S", "30")
    check_grace(25)
    with pytest.raises(ValueError, match="preemption_grace_s=28 does not fit the pods' termination grace period of 30"):
        check_grace(28)
