"""A run folder's MLflow store keeps working after the folder is copied or moved, with the original gone:
its artifacts list, its models load (transformers and pyfunc, by model id and from the registry)."""
from __future__ import annotations

import shutil

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from orchestrator.tracking import TrackingConfig, TrackingSession
from orchestrator.tracking.relocate import artifact_root, relocate_if_free, relocate_store
from tests.orchestrator.test_tracking_model import tiny_export
from workers.run_layout import RunLayout

FAST = TrackingConfig(flush_interval_s=0.1, retry_initial_s=0.1, retry_max_s=0.5, boundary_retry_s=5,
                      register_models={"student": "pofa-portable-student"})


@pytest.fixture
def moved(tmp_path, monkeypatch):
    """A tracked run (a stage with an artifact and a registered model) copied elsewhere, the original removed."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    original = tmp_path / "original" / "run"
    weights = tiny_export(original / "student" / "model").state_dict()
    session = TrackingSession.open(FAST, original, run_name="run")
    run_id = session.start_stage("student")
    session.log_artifact(original / "student" / "model" / "config.json", key="student")
    uri = session.log_model(original / "student" / "model", key="student", name="student-model",
                            registered_model_name=FAST.register_models["student"],
                            metrics={"val/mlm_acc": 0.25, "sparsity": 0.9}, step=40,
                            params={"student": {"learning_rate": 0.001}})
    session.end_stage("student")
    session.finish()
    copy = tmp_path / "elsewhere" / "run"
    shutil.copytree(original, copy)
    shutil.rmtree(tmp_path / "original")
    return copy, run_id, uri, weights


def test_the_copy_without_pofa_still_points_at_the_removed_original(moved):
    """What a copied store looks like before pofa opens it: the reason relocation exists."""
    copy, run_id, _, _ = moved
    client = MlflowClient(f"sqlite:///{copy / 'mlflow.db'}")
    assert client.list_artifacts(run_id) == []


def test_a_copied_run_loads_after_relocation(moved, monkeypatch):
    copy, run_id, uri, weights = moved
    layout = RunLayout.open(str(copy))
    assert relocate_if_free(layout) > 0
    assert relocate_store(layout) == 0  # in place now: nothing more to rewrite
    store = f"sqlite:///{copy / 'mlflow.db'}"
    client = MlflowClient(store)
    assert {a.path for a in client.list_artifacts(run_id)} == {"config.json"}
    experiment = client.get_experiment(client.get_run(run_id).info.experiment_id)
    assert experiment.artifact_location == artifact_root(layout) == (copy / "mlartifacts").resolve().as_uri()

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    pipe = mlflow.transformers.load_model(uri)
    torch.testing.assert_close(pipe.model.state_dict()["cls.predictions.bias"], weights["cls.predictions.bias"])
    assert mlflow.pyfunc.load_model(uri).predict(["the cat [MASK] on the mat"]) is not None
    registered = mlflow.transformers.load_model("models:/pofa-portable-student/1")
    assert registered.task == "fill-mask"

    logged = client.get_logged_model(uri.removeprefix("models:/"))
    assert {m.key: m.value for m in logged.metrics} == {"val/mlm_acc": 0.25, "sparsity": 0.9}
    assert all(m.step == 40 for m in logged.metrics)
    assert logged.params["student.learning_rate"] == "0.001"
    assert logged.tags["pofa.model_dir"] == "student/model"  # relative: no machine's path in the store


def test_a_pofa_run_on_the_copy_relocates_its_store(moved):
    copy, run_id, _, _ = moved
    session = TrackingSession.open(FAST, copy, run_name="run")
    assert session.resumed  # the same parent run, found through tracking.json
    client = MlflowClient(session.uri)
    assert client.get_run(run_id).info.artifact_uri.startswith((copy / "mlartifacts").resolve().as_uri() + "/")
    assert {a.path for a in client.list_artifacts(run_id)} == {"config.json"}
    session.finish()


def test_a_run_held_by_a_pofa_run_is_left_to_it(moved):
    """`pofa status` while a `pofa run` holds the folder never writes the store (that run is its only writer)."""
    from orchestrator.rundir import RunDir

    copy, run_id, _, _ = moved
    holder = RunDir(str(copy))
    holder.acquire(console=lambda _: None)
    try:
        assert relocate_if_free(RunLayout.open(str(copy))) == 0
    finally:
        holder.release()
    assert MlflowClient(f"sqlite:///{copy / 'mlflow.db'}").list_artifacts(run_id) == []


def test_an_object_store_run_fetched_to_disk_reads_its_local_artifacts(moved):
    """A run written to `s3://...` and downloaded: its store names the bucket; pofa points it at the folder."""
    import sqlite3

    copy, run_id, uri, _ = moved
    layout = RunLayout.open(str(copy))
    local = artifact_root(layout)
    db = sqlite3.connect(copy / "mlflow.db")
    with db:  # what the store holds when the run directory was s3://bucket/runs/run
        for table, column in (("experiments", "artifact_location"), ("runs", "artifact_uri"),
                              ("logged_models", "artifact_location"), ("model_versions", "storage_location")):
            db.execute(f"UPDATE {table} SET {column} = replace({column}, ?, ?)",
                       ((copy.parent.parent / "original" / "run" / "mlartifacts").as_uri(),
                        "s3://bucket/runs/run/mlartifacts"))
    db.close()
    client = MlflowClient(f"sqlite:///{copy / 'mlflow.db'}")
    assert client.get_run(run_id).info.artifact_uri.startswith("s3://bucket/runs/run/mlartifacts/")
    assert relocate_if_free(layout) > 0
    assert client.get_run(run_id).info.artifact_uri.startswith(local + "/")
    assert {a.path for a in client.list_artifacts(run_id)} == {"config.json"}
    logged = client.get_logged_model(uri.removeprefix("models:/"))
    assert logged.artifact_location.startswith(local + "/")
