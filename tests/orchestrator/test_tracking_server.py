"""Tracking against a real `mlflow server` process: outages lose nothing; bad URIs fail fast."""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from workers.run_layout import RunLayout
from orchestrator.tracking import (
    TrackingConfig,
    TrackingSession,
    TrackingUnreachableError,
    check_reachable,
    check_tracking,
)

pytestmark = pytest.mark.integration  # Ray, DeepSpeed, a server or a subprocess pipeline

MLFLOW = Path(sys.executable).with_name("mlflow")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MlflowServer:
    """An `mlflow server` on 127.0.0.1 in its own process group, so it can be killed whole."""

    def __init__(self, root: Path, port: int) -> None:
        self.root, self.port = root, port
        self.proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 180.0) -> None:
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        log = open(self.root / "server.log", "ab")
        self.proc = subprocess.Popen(
            [str(MLFLOW), "server", "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
             "--artifacts-destination", str(self.root / "server-artifacts"),
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.root / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise AssertionError(f"mlflow server did not start: {(self.root / 'server.log').read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL the server and its workers: an abrupt outage, not a graceful shutdown."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # One server for the module (start-up takes seconds); the outage test restarts it in place.
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow-server"), free_port())
    srv.start()
    yield srv
    srv.kill()


def wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_server_killed_and_restarted_loses_no_metric(server, tmp_path, caplog):
    config = TrackingConfig(uri=server.uri, flush_interval_s=0.2, retry_initial_s=0.2, retry_max_s=1.0,
                            request_timeout_s=5)
    session = TrackingSession.open(config, tmp_path / "run", recipe={"name": "tiny"})
    run_id = session.start_stage("student")
    tracker = session.tracker("student")

    def train(steps: range) -> None:
        for step in steps:
            tracker.log_metrics({"loss": 1.0 / (step + 1), "sparsity/global": step / 100}, step)
            time.sleep(0.01)  # the "training step"

    with caplog.at_level(logging.WARNING, logger="pofa.tracking"):
        train(range(0, 30))
        assert tracker.flush(timeout_s=30)
        server.kill()
        train(range(30, 60))
        wait_for(lambda: tracker.in_outage, 60, "the sender to notice the outage")
        # Training went on: the records are held, and a flush does not wait on a dead server.
        train(range(60, 80))
        assert tracker.pending > 0
        assert tracker.flush(timeout_s=30) is False
        server.start()
        train(range(80, 100))
        wait_for(lambda: not tracker.in_outage, 60, "the sender to reach the restarted server")
        assert tracker.flush(timeout_s=60)
    session.end_stage("student")
    session.finish()

    client = MlflowClient(server.uri)
    for key in ("loss", "sparsity/global"):
        history = client.get_metric_history(run_id, key)
        assert sorted(m.step for m in history) == list(range(100))
    assert client.get_run(run_id).info.status == "FINISHED"
    outage_warnings = [r for r in caplog.records if "is not answering" in r.getMessage()]
    assert len(outage_warnings) == 1, [r.getMessage() for r in caplog.records]
    # The sender retried many times, but nothing else on the console repeated per attempt.
    assert not [r for r in caplog.records if r.name.startswith("urllib3")]
    assert any("is back" in r.getMessage() for r in caplog.records)


def test_rerun_against_server_reuses_parent(server, tmp_path):
    config = TrackingConfig(uri=server.uri, flush_interval_s=0.2)
    first = TrackingSession.open(config, tmp_path / "run", recipe={"name": "tiny"})
    stage = first.start_stage("teacher")
    second = TrackingSession.open(config, tmp_path / "run", recipe={"name": "tiny"})
    assert (second.parent_run_id, second.start_stage("teacher")) == (first.parent_run_id, stage)
    assert "/#/experiments/" in second.how_to_view()


def test_a_server_that_is_down_at_start_stops_nothing_and_gets_everything_later(tmp_path, caplog):
    """The run starts (and resumes) while MLflow is down: nothing waits, a warning says so, and when
    the server comes up the parent run, the stage run, its params and metrics are all there."""
    port = free_port()  # nothing listens there yet
    config = TrackingConfig(uri=f"http://127.0.0.1:{port}", flush_interval_s=0.2, retry_initial_s=0.2,
                            retry_max_s=1.0, connect_timeout_s=1.0)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="pofa.tracking"):
        session = TrackingSession.open(config, tmp_path / "run", recipe={"name": "tiny", "seed": 42})
        session.start_stage("teacher", params={"lr": 0.1})
        tracker = session.tracker("teacher")
        for step in (1, 2, 3):
            tracker.log_metrics({"loss": 1.0 / step}, step)
    assert time.monotonic() - started < 10  # the run did not wait for MLflow
    assert any("The run goes on" in r.getMessage() for r in caplog.records)
    assert session.parent_run_id is None and not (tmp_path / "run" / "tracking.json").exists()
    server = MlflowServer(tmp_path / "late-server", port)
    (tmp_path / "late-server").mkdir()
    server.start()
    try:
        wait_for(lambda: session.stage_run_id("teacher") is not None, 60, "the stage run to be created")
        session.end_stage("teacher")
        session.finish()
        client = MlflowClient(server.uri)
        stage = client.get_run(session.stage_run_id("teacher"))
        assert stage.data.params["lr"] == "0.1" and stage.info.status == "FINISHED"
        assert [m.value for m in client.get_metric_history(stage.info.run_id, "loss")] == [1.0, 0.5, 1.0 / 3]
        assert client.get_run(session.parent_run_id).data.params["seed"] == "42"
    finally:
        server.kill()


def test_a_wrong_setting_still_fails_at_once(tmp_path):
    # A blackholed address (TEST-NET-1, never routed) must time out rather than hang.
    started = time.monotonic()
    with pytest.raises(TrackingUnreachableError, match="192.0.2.1"):
        check_tracking(TrackingConfig(uri="http://192.0.2.1:5000", connect_timeout_s=1.0), RunLayout.open(str(tmp_path)))
    assert time.monotonic() - started < 20
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the database folder should be")
    with pytest.raises(TrackingUnreachableError, match="cannot create the folder"):
        TrackingSession.open(TrackingConfig(uri=f"sqlite:///{blocked}/sub/mlflow.db"), tmp_path / "run")


def test_preflight_accepts_a_live_server_and_skips_disabled_tracking(server, tmp_path):
    assert check_tracking(TrackingConfig(uri=server.uri), RunLayout.open(str(tmp_path))) == server.uri
    assert check_tracking(TrackingConfig(enabled=False, uri="http://127.0.0.1:9"), RunLayout.open(str(tmp_path))) is None


def test_http_server_that_is_not_mlflow_is_named(tmp_path):
    port = free_port()
    web = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                            "--directory", str(tmp_path)], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        def listening() -> bool:
            with socket.socket() as sock:
                return sock.connect_ex(("127.0.0.1", port)) == 0

        wait_for(listening, 30, "the web server")
        with pytest.raises(TrackingUnreachableError, match="does not look like an MLflow"):
            check_reachable(f"http://127.0.0.1:{port}", timeout_s=5)
    finally:
        web.kill()
        web.wait(timeout=10)
