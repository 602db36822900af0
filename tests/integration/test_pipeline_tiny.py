"""The whole `tiny` recipe through the CLI: preprocess -> teacher -> student -> report, tracked in MLflow."""
import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

SHORT = ["preprocess.source.max_documents=30", "ray.num_cpus=2",
         "teacher.max_steps=30", "teacher.eval_every=15", "teacher.checkpoint_every=15",
         "student.max_steps=40", "student.eval_every=20", "student.checkpoint_every=20",
         "student.pruning.schedule.policy_end_step=20", "student.pruning.schedule.end_pruning_step=30",
         "student.pruning.schedule.pruning_frequency=10"]


def _pofa(run_dir, *extra, timeout=900):
    cmd = [sys.executable, "-m", "orchestrator.cli", "run", "tiny", "--run-dir", str(run_dir)]
    for s in SHORT:
        cmd += ["--set", s]
    return subprocess.run(cmd + list(extra), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tiny")
    res = _pofa(run_dir)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return run_dir, res.stdout


def test_student_is_exported_at_90_percent_sparsity(tiny_run):
    run_dir, out = tiny_run
    model_dir = run_dir / "student" / "model"
    report = json.load(open(model_dir / "sparsity.json"))
    assert abs(report["global_sparsity"] - 0.9) < 1e-3
    weights = load_file(str(model_dir / "model.safetensors"))
    enc = [w for n, w in weights.items() if ".encoder." in n and n.endswith("weight") and w.dim() == 2]
    assert enc and all(abs(float((w == 0).float().mean()) - 0.9) < 2e-3 for w in enc)
    assert "[student] done" in out and "mlflow ui --backend-store-uri sqlite:///" in out


def test_report_and_manifests(tiny_run):
    run_dir, _ = tiny_run
    text = (run_dir / "report" / "README.md").read_text()
    for section in ("## Data", "## Validation", "## Sparsity per layer", "## Wall time", "## Exported models"):
        assert section in text
    for stage in ("preprocess", "teacher", "student", "report"):
        assert json.load(open(run_dir / stage / "manifest.json"))["status"] == "complete"


def test_mlflow_parent_nested_runs_and_metrics(tiny_run):
    import mlflow
    from mlflow.tracking import MlflowClient

    run_dir, _ = tiny_run
    client = MlflowClient(f"sqlite:///{run_dir}/mlflow.db")
    ids = json.load(open(run_dir / "tracking.json"))
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    children = {r.data.tags.get("pofa.stage"): r for r in runs if r.data.tags.get("mlflow.parentRunId")}
    assert {"preprocess", "teacher", "student", "report"} <= set(children)
    student = children["student"]
    for key in ("loss", "loss/hard", "loss/kd", "lr", "sparsity/global", "val/mlm_acc", "val/nsp_acc", "val/loss"):
        assert key in student.data.metrics, key
    hist = client.get_metric_history(student.info.run_id, "sparsity/global")
    steps = [m.step for m in hist]
    assert steps == sorted(steps) and hist[-1].value == pytest.approx(0.9, abs=1e-3)
    assert any(k.startswith("sparsity/") and k != "sparsity/global" for k in student.data.metrics)
    assert children["preprocess"].data.metrics["instances_train"] > 0
    assert ids and parents[0].data.params["preprocess.max_seq_length"] == "128"


def test_rerun_skips_every_stage_and_reuses_the_parent_run(tiny_run):
    run_dir, _ = tiny_run
    before = json.load(open(run_dir / "tracking.json"))
    res = _pofa(run_dir, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    for stage in ("preprocess", "teacher", "student", "report"):
        assert f"[{stage}] up to date (manifest matches): skipped" in res.stdout
    assert json.load(open(run_dir / "tracking.json")) == before
