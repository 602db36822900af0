"""The whole `tiny` recipe through the CLI: preprocess -> teacher -> student -> finetune -> report, tracked in
MLflow. Shortened: fewer documents and steps, one fine-tuning seed."""
import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

pytestmark = pytest.mark.integration  # Ray, DeepSpeed, a server or a subprocess pipeline

SHORT = ["preprocess.source.max_documents=30", "ray.num_cpus=2",
         "teacher.max_steps=30", "teacher.eval_every=15", "teacher.checkpoint_every=15",
         "student.max_steps=40", "student.eval_every=20", "student.checkpoint_every=20",
         "student.pruning.schedule.policy_end_step=20", "student.pruning.schedule.end_pruning_step=30",
         "student.pruning.schedule.pruning_frequency=10",
         "finetune.seeds=[42]"]


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
    for section in ("## Data", "## Validation", "## Downstream (pattern locked)", "## Sparsity per layer",
                    "## Wall time", "## Exported models"):
        assert section in text
    assert "| model | Polarity (gensim) |" in text and "dense task teacher (this run)" in text
    for stage in ("preprocess", "teacher", "student", "finetune", "report"):
        assert json.load(open(run_dir / stage / "manifest.json"))["status"] == "complete"


def test_training_honours_the_masking_contract(tiny_run):
    """The default tiny data (length 128, up to 20 predictions) give BERT's ~15% of MLM targets at
    every logged step of both pretraining stages."""
    run_dir, _ = tiny_run
    for stage in ("teacher", "student"):
        fractions = [json.loads(line)["data/masked_fraction"] for line in open(run_dir / stage / "metrics.jsonl")]
        assert fractions and all(0.12 <= f <= 0.16 for f in fractions), (stage, min(fractions), max(fractions))


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
    assert {"preprocess", "teacher", "student", "finetune", "finetune/polarity/teacher",
            "finetune/polarity/seed-42", "report"} <= set(children)
    seed = children["finetune/polarity/seed-42"]
    assert seed.data.tags["mlflow.parentRunId"] == children["finetune"].info.run_id  # nested under the stage
    assert {"eval/accuracy", "loss/kd", "sparsity/global"} <= set(seed.data.metrics)
    assert children["finetune"].data.metrics["results.polarity.accuracy"] == seed.data.metrics["eval/accuracy"]
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
    for stage in ("preprocess", "teacher", "student", "finetune", "report"):
        assert f"[{stage}] up to date (manifest matches): skipped" in res.stdout
    assert json.load(open(run_dir / "tracking.json")) == before


def test_finetune_keeps_the_students_pattern_and_records_results(tiny_run):
    run_dir, _ = tiny_run
    stats = json.load(open(run_dir / "finetune" / "manifest.json"))["stats"]
    polarity = stats["results"]["polarity"]
    assert set(polarity["seeds"]) == {"42"} and 0 <= polarity["accuracy"] <= 100
    assert polarity["accuracy"] == polarity["seeds"]["42"]["accuracy"]
    assert stats["data"]["polarity"]["train"]["examples"] == 160  # 80/20 of the 200 real sentences
    import pyarrow.parquet as pq

    from pipelines.finetune.metrics import majority_baseline

    labels = pq.read_table(run_dir / "finetune" / "polarity" / "data" / "validation.parquet").column("label")
    assert polarity["accuracy"] > majority_baseline(labels.to_numpy())  # learned something on the held-out 20%
    assert polarity["sparsity"]["42"] == pytest.approx(0.9, abs=1e-3)
    student = load_file(str(run_dir / "student" / "model" / "model.safetensors"))
    tuned = load_file(str(run_dir / "finetune" / "polarity" / "model" / "model.safetensors"))
    encoder = [n for n in student if ".encoder." in n and n.endswith("weight") and student[n].dim() == 2]
    assert encoder
    for name in encoder:  # the exact zero pattern, weight by weight
        assert (student[name] == 0).equal(tuned[name] == 0), name
