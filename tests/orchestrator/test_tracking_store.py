"""Tracking against a real MLflow SQLite store inside the run directory."""
from __future__ import annotations

import json
import logging
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from mlflow import MlflowClient

from orchestrator.tracking import AsyncMlflowTracker, TrackingConfig, TrackingSession, default_tags
from workers.tracking import NullTracker, Tracker
from orchestrator.tracking.session import LOCAL_STORE_KEY

RECIPE = {
    "name": "tiny",
    "model": {"hidden_size": 64, "num_layers": 2},
    "pruning": {"target_sparsity": 0.9, "layers": ["query", "key"]},
}
FAST = TrackingConfig(flush_interval_s=0.1, retry_initial_s=0.1, retry_max_s=0.5, boundary_retry_s=5)
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # A working directory of its own: nothing may land in ./mlruns.
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return tmp_path / "run"


def steps_of(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return [m.step for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def artifact_names(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    return {Path(f.path).name for f in client.list_artifacts(run_id, path)}


def test_pipeline_run_records_parent_nested_runs_params_metrics_artifacts(run_dir):
    session = TrackingSession.open(
        FAST, run_dir, recipe=RECIPE, run_name="tiny", tags=default_tags("127.0.0.1:6379", 2)
    )
    client = MlflowClient(session.uri)
    assert session.uri == f"sqlite:///{run_dir.resolve() / 'mlflow.db'}"

    # preprocess: manifest statistics and the manifest itself.
    pre = session.start_stage("preprocess")
    manifest = run_dir / "data" / "manifest.json"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"num_documents": 12}))
    session.log_metrics({"data/num_documents": 12, "data/num_tokens": 3456}, key="preprocess")
    session.log_artifact(manifest, key="preprocess")
    session.end_stage("preprocess")

    # teacher: the training loop's tracker, as the worker would get it.
    teacher = session.start_stage("teacher", params={"lr": 1e-3})
    tracker = session.tracker("teacher")
    assert isinstance(tracker, Tracker)
    for step in range(1, 21):
        tracker.log_metrics({"loss": 5.0 / step, "lr": 1e-3, "sparsity/global": step / 20,
                             "sparsity/encoder.layer.0.query": step / 25}, step=step)
    tracker.set_tags({"pofa.restarts": "0"})
    ckpt_dir = run_dir / "teacher" / "export"
    ckpt_dir.mkdir(parents=True)
    (ckpt_dir / "config.json").write_text("{}")
    tracker.log_artifact(str(ckpt_dir), "export")
    assert tracker.flush(timeout_s=30)
    plots = session.log_stage_plots("teacher", run_dir / "teacher" / "plots")
    assert [p.name for p in plots] == ["loss.png", "sparsity.png"]
    for png in plots:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    session.end_stage("teacher")

    # Sub-runs nest under their stage.
    finetune = session.start_stage("finetune")
    seed = session.start_stage("finetune/sst2/seed1")
    session.end_stage("finetune/sst2/seed1", "FAILED")
    session.end_stage("finetune", "KILLED")
    session.finish()

    parent = client.get_run(session.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["model.hidden_size"] == "64"
    assert parent.data.params["pruning.target_sparsity"] == "0.9"
    assert parent.data.params["pruning.layers"] == '["query", "key"]'
    assert parent.data.tags["pofa.ray_address"] == "127.0.0.1:6379"
    assert parent.data.tags["pofa.num_workers"] == "2"
    assert parent.data.tags["pofa.version"]
    assert parent.data.tags["pofa.status"] == "finished"

    runs = {key: client.get_run(run_id) for key, run_id in
            {"preprocess": pre, "teacher": teacher, "finetune": finetune, "seed": seed}.items()}
    for key in ("preprocess", "teacher", "finetune"):
        assert runs[key].data.tags["mlflow.parentRunId"] == session.parent_run_id
    assert runs["seed"].data.tags["mlflow.parentRunId"] == finetune
    assert {k: r.info.status for k, r in runs.items()} == {
        "preprocess": "FINISHED", "teacher": "FINISHED", "finetune": "KILLED", "seed": "FAILED"}
    assert runs["teacher"].data.tags["pofa.stage_status"] == "finished"
    assert runs["teacher"].data.tags["pofa.restarts"] == "0"
    assert runs["teacher"].data.params == {"lr": "0.001"}
    assert runs["preprocess"].data.metrics["data/num_tokens"] == 3456

    for key in ("loss", "lr", "sparsity/global", "sparsity/encoder.layer.0.query"):
        assert steps_of(client, teacher, key) == list(range(1, 21))
    assert artifact_names(client, pre) == {"manifest.json"}
    assert artifact_names(client, teacher) == {"export", "plots"}
    assert artifact_names(client, teacher, "plots") == {"loss.png", "sparsity.png"}
    assert artifact_names(client, teacher, "export") == {"config.json"}

    # Everything lives in the run directory, nothing in the working directory.
    assert (run_dir / "mlartifacts").is_dir()
    assert not (Path.cwd() / "mlruns").exists()
    assert "mlflow ui --backend-store-uri sqlite:///" in session.how_to_view()
    registry = json.loads((run_dir / "tracking.json").read_text())
    assert registry["stores"][LOCAL_STORE_KEY]["stages"]["teacher"] == {"run_id": teacher, "status": "FINISHED"}


def test_rerun_reuses_parent_and_unfinished_stage_run(run_dir):
    first = TrackingSession.open(FAST, run_dir, recipe=RECIPE)
    done = first.start_stage("preprocess")
    first.end_stage("preprocess")
    crashed = first.start_stage("teacher")
    tracker = first.tracker("teacher")
    tracker.log_metrics({"loss": 3.0}, step=1)
    tracker.log_metrics({"loss": 2.0}, step=2)
    assert tracker.close()
    # ...the process dies here: no end_stage, no finish.

    second = TrackingSession.open(FAST, run_dir, recipe=RECIPE)
    assert second.resumed
    assert second.parent_run_id == first.parent_run_id
    assert second.start_stage("teacher") == crashed
    client = MlflowClient(second.uri)
    assert client.get_run(crashed).info.status == "RUNNING"
    resumed = second.tracker("teacher")
    resumed.log_metrics({"loss": 1.0}, step=3)
    assert resumed.flush(timeout_s=30)
    second.end_stage("teacher")
    # A finished stage that runs again (e.g. forced) gets a new nested run.
    assert second.start_stage("preprocess") != done
    second.finish()

    assert steps_of(client, crashed, "loss") == [1, 2, 3]
    experiment = second.experiment_id
    all_runs = client.search_runs([experiment])
    parents = [r for r in all_runs if "mlflow.parentRunId" not in r.data.tags]
    assert [r.info.run_id for r in parents] == [first.parent_run_id]
    assert len(all_runs) == 1 + 3

    # The same run directory with a different recipe is refused, naming the cause.
    with pytest.raises(ValueError, match="another recipe"):
        TrackingSession.open(FAST, run_dir, recipe={**RECIPE, "name": "other"})


def test_tracker_pickles_and_logs_from_another_process(run_dir, tmp_path):
    session = TrackingSession.open(FAST, run_dir)
    run_id = session.start_stage("student")
    tracker = session.tracker("student")
    blob = pickle.dumps(tracker)
    # Only the identity travels: no client, thread or lock state.
    assert b"Thread" not in blob and b"MlflowClient" not in blob
    (tmp_path / "tracker.pkl").write_bytes(blob)
    child = textwrap.dedent(f"""
        import os, pickle, time
        tracker = pickle.loads(open({str(tmp_path / 'tracker.pkl')!r}, "rb").read())
        for step in range(10):
            tracker.log_metrics({{"loss": 1.0 / (step + 1), "throughput/samples_per_s": 100.0}}, step)
        # No flush: the background sender delivers on its own every flush interval...
        deadline = time.monotonic() + 60
        while tracker.pending and time.monotonic() < deadline:
            time.sleep(0.05)
        print("child sent", tracker.run_id, tracker.pending, flush=True)
        # ...so a process that dies abruptly now (no atexit, no close) has lost nothing.
        os._exit(0)
    """)
    done = subprocess.run([sys.executable, "-c", child], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"child sent {run_id} 0" in done.stdout
    client = MlflowClient(session.uri)
    assert steps_of(client, run_id, "throughput/samples_per_s") == list(range(10))
    assert not (Path.cwd() / "mlruns").exists()


def test_refused_records_are_dropped_without_blocking_the_rest(run_dir, caplog):
    session = TrackingSession.open(FAST, run_dir)
    run_id = session.start_stage("teacher")
    tracker = session.tracker("teacher")
    assert isinstance(tracker, AsyncMlflowTracker)
    with caplog.at_level(logging.WARNING, logger="pofa.tracking"):
        tracker.log_metrics({"loss": 1.0, "bad!key": 2.0}, step=0)
        tracker.log_metrics({"loss": 0.5}, step=1)
        assert tracker.flush(timeout_s=30)
    assert steps_of(MlflowClient(session.uri), run_id, "loss") == [0, 1]
    assert any("bad!key" in r.getMessage() for r in caplog.records)
    assert tracker.dropped == 1
    with pytest.raises(ValueError, match="'loss'"):
        tracker.log_metrics({"loss": "high"}, step=2)


def test_disabled_tracking_touches_nothing(run_dir):
    session = TrackingSession.open(TrackingConfig(enabled=False), run_dir, recipe=RECIPE)
    assert session.start_stage("teacher") is None
    assert isinstance(session.tracker("teacher"), NullTracker)
    session.end_stage("teacher")
    session.finish()
    assert session.how_to_view() is None
    assert not run_dir.exists()


def test_workers_records_reach_the_one_store_through_the_driver(ray_local, tmp_path):
    """A rank-0 worker on "another node" (its own mirror folder, where the driver's SQLite path means
    nothing) logs through the relay: its metrics, tags and a file land in the driver's store, and it
    never opens a database of its own."""
    import os

    session = TrackingSession.open(TrackingConfig(flush_interval_s=0.2), tmp_path / "run", recipe={"name": "t"})
    session.start_stage("student")
    tracker = session.worker_tracker("student")
    other_node = tmp_path / "node-b-mirror"
    report = tmp_path / "run" / "student" / "summary.json"
    report.parent.mkdir(parents=True)
    report.write_text("{}")

    @ray_local.remote(runtime_env={"env_vars": {"POFA_MIRROR_DIR": str(other_node)}})
    def rank0(tracker, report: str) -> list[str]:
        for step in (1, 2, 3):
            tracker.log_metrics({"loss": 1.0 / step}, step)
        tracker.set_tags({"student.attempts": "1"})
        tracker.log_artifact(report)
        tracker.flush()
        os.makedirs(os.environ["POFA_MIRROR_DIR"], exist_ok=True)
        return os.listdir(os.environ["POFA_MIRROR_DIR"])

    assert ray_local.get(rank0.remote(tracker, str(report))) == []  # no database on that node
    session.end_stage("student")
    session.finish()
    client = MlflowClient(session.uri)
    run = client.get_run(session.stage_run_id("student"))
    assert [m.value for m in client.get_metric_history(run.info.run_id, "loss")] == [1.0, 0.5, 1.0 / 3]
    assert run.data.tags["student.attempts"] == "1"
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["summary.json"]
    assert not list(other_node.rglob("mlflow.db"))
