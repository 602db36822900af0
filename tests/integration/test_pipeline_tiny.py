"""The whole `tiny` recipe through the CLI: preprocess -> teacher -> student -> finetune -> report, tracked in
MLflow. Shortened: fewer documents and steps, one fine-tuning seed."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from workers.run_records import AttemptRecord, read_record_lines

pytestmark = pytest.mark.integration  # Ray, DeepSpeed, a server or a subprocess pipeline

SHORT = ["preprocess.source.max_documents=30", "ray.num_cpus=2",
         "teacher.max_steps=30", "teacher.eval_every=15", "teacher.checkpoint_every=15",
         "student.max_steps=40", "student.eval_every=20", "student.checkpoint_every=20",
         "student.pruning.schedule.policy_end_step=20", "student.pruning.schedule.end_pruning_step=30",
         "student.pruning.schedule.pruning_frequency=10",
         "finetune.seeds=[42]", "tracking.register_models.finetune/polarity=tiny-polarity"]


def _pofa(run_dir, *extra, timeout=900):
    cmd = [sys.executable, "-m", "orchestrator.cli", "run", "tiny", "--run-dir", str(run_dir)]
    for s in SHORT:
        cmd += ["--set", s]
    return subprocess.run(cmd + list(extra), capture_output=True, text=True, timeout=timeout)


def _sigterm_while(run_dir, stage: str, steps: int, *extra: str) -> dict:
    """`pofa run` in its own process group, SIGTERM to the whole group once `stage` logged `steps`
    steps (as a shell's kill or a container stop does); returns its exit code, output and how long it
    took to exit."""
    cmd = [sys.executable, "-m", "orchestrator.cli", "run", "tiny", "--run-dir", str(run_dir)]
    for s in SHORT:
        cmd += ["--set", s]
    proc = subprocess.Popen(cmd + list(extra), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    metrics = run_dir / stage / "metrics.jsonl"
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= steps:
            break
        time.sleep(0.2)
    sent = time.time()
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    return {"rc": proc.returncode, "out": out, "exit_s": time.time() - sent}


def _committed(run_dir, stage: str) -> list[int]:
    folder = run_dir / stage / "checkpoints"
    return sorted(int(n[5:]) for n in os.listdir(folder) if n.startswith("step-") and (folder / n / "MANIFEST.json").exists())


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The tiny recipe as a user on a preemptible machine lives it: SIGTERM mid-teacher (no periodic
    checkpoint falls in), a rerun with other operational settings, one worker instead of two among
    them, that resumes it and is SIGTERMed mid-student, a rerun with a changed learning rate that is
    refused, and the plain rerun that finishes."""
    run_dir = tmp_path_factory.mktemp("tiny")
    events = {"teacher": _sigterm_while(run_dir, "teacher", 10, "--set", "teacher.checkpoint_every=1000")}
    events["teacher_steps"] = _committed(run_dir, "teacher")
    events["status"] = subprocess.run([sys.executable, "-m", "orchestrator.cli", "status", str(run_dir)],
                                      capture_output=True, text=True, timeout=120)
    events["student"] = _sigterm_while(run_dir, "student", 6, "--set", "teacher.max_failures=3", "--set",
                                       "teacher.keep_checkpoints=3", "--set", "teacher.num_workers=1", "--set",
                                       "student.checkpoint_every=1000")
    events["student_steps"] = _committed(run_dir, "student")
    events["refused"] = _pofa(run_dir, "--set", "teacher.learning_rate=0.01", timeout=120)
    events["teacher_after_refusal"] = _committed(run_dir, "teacher")
    res = _pofa(run_dir)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return run_dir, res.stdout, events


def test_sigterm_checkpoints_the_current_step_and_the_rerun_resumes_there(tiny_run):
    run_dir, out, events = tiny_run
    teacher, student = events["teacher"], events["student"]
    for event, stage, steps in ((teacher, "teacher", events["teacher_steps"]),
                                (student, "student", events["student_steps"])):
        assert event["rc"] == 143 and event["exit_s"] < 60, event["out"][-3000:]
        assert len(steps) == 1 and steps[0] >= 6  # the step it was at, not a periodic checkpoint
        assert f"[{stage}] preempted at step {steps[0]}" in event["out"]
    assert f"[teacher] resuming from step {events['teacher_steps'][0]} (checkpoint teacher/checkpoints/step-" in student["out"]
    teacher_attempts = read_record_lines(AttemptRecord, str(run_dir / "teacher" / "attempts.jsonl"), "teacher")
    assert [len(a.nodes) for a in teacher_attempts] == [2, 1]  # resumed on one worker instead of two
    assert f"[student] resuming from step {events['student_steps'][0]} (checkpoint student/checkpoints/step-" in out
    student_attempts = read_record_lines(AttemptRecord, str(run_dir / "student" / "attempts.jsonl"), "student")
    starts = [a.start_step for a in student_attempts]
    assert starts == [0, events["student_steps"][0]]


def test_status_shows_the_killed_run_resumable_at_its_checkpoint(tiny_run):
    _, _, events = tiny_run
    status = events["status"]
    step = events["teacher_steps"][0]
    assert status.returncode == 0, status.stderr
    assert f"teacher    resumable    at step {step} of 30 (checkpoint teacher/checkpoints/step-{step:08d})" in status.stdout
    assert "preprocess done" in status.stdout and "student    not started" in status.stdout


def test_the_console_is_short_and_the_rest_is_in_the_logs(tiny_run):
    """Not a terminal: a header, at most one line per tenth and a result per stage, the closing table;
    what Ray, Ray Train, DeepSpeed and transformers print is in <run>/logs/, one file per process."""
    run_dir, out, events = tiny_run
    assert len(out.splitlines()) <= 60, out
    for text in [out] + [e["out"] for e in (events["teacher"], events["student"])]:
        for noise in ("Reporting training result", "LOAD REPORT", "built successfully", "(pid=", "Traceback"):
            assert noise not in text, text
    teacher_logs = sorted(os.listdir(run_dir / "logs" / "teacher"))
    assert teacher_logs == ["attempt-1", "attempt-2"]  # the SIGTERMed attempt, then the resumed one
    first = run_dir / "logs" / "teacher" / "attempt-1"
    assert {"driver.log", "worker-0.log", "worker-1.log"} <= set(os.listdir(first))
    worker = (first / "worker-0.log").read_text()
    assert "[teacher] step" in worker  # rank 0's own progress lines
    finetune = run_dir / "logs" / "finetune" / "attempt-1"
    assert any(n.startswith("polarity-seed-42") for n in os.listdir(finetune))
    seed_log = (finetune / "polarity-seed-42" / "worker-0.log").read_text()
    assert "task head classifier starts fresh" in seed_log


def test_a_changed_learning_rate_is_refused_and_deletes_nothing(tiny_run):
    _, _, events = tiny_run
    refused = events["refused"]
    assert refused.returncode == 2 and "Ray at" not in refused.stdout
    assert "teacher.learning_rate 0.002 -> 0.01" in refused.stderr and "--redo teacher" in refused.stderr
    # the finished teacher's checkpoints are all there: the preemption's, then the periodic ones after it
    preempted = events["teacher_steps"][0]
    assert events["teacher_after_refusal"] == [preempted] + [s for s in (15, 30) if s > preempted]


def test_student_is_exported_at_90_percent_sparsity(tiny_run):
    run_dir, out, _ = tiny_run
    model_dir = run_dir / "student" / "model"
    report = json.load(open(model_dir / "sparsity.json"))
    assert abs(report["global_sparsity"] - 0.9) < 1e-3
    weights = load_file(str(model_dir / "model.safetensors"))
    enc = [w for n, w in weights.items() if ".encoder." in n and n.endswith("weight") and w.dim() == 2]
    assert enc and all(abs(float((w == 0).float().mean()) - 0.9) < 2e-3 for w in enc)
    assert "[student] done" in out and "mlflow ui --backend-store-uri sqlite:///" in out


def test_report_and_manifests(tiny_run):
    run_dir, _, _ = tiny_run
    text = (run_dir / "report" / "README.md").read_text()
    for section in ("## Data", "## Validation", "## Downstream (pattern locked)", "## Sparsity per layer",
                    "## Wall time", "## Exported models"):
        assert section in text
    assert "| model | Polarity (gensim) |" in text and "dense task teacher (this run)" in text
    for stage in ("preprocess", "teacher", "student", "finetune", "report"):
        assert json.load(open(run_dir / stage / "manifest.json"))["status"] == "complete"


def test_report_has_an_inference_row_per_export(tiny_run):
    """Every export timed in ONNX Runtime and sized, beside the dense model of its kind; in MLflow too."""
    from mlflow.tracking import MlflowClient

    run_dir, _, _ = tiny_run
    report = json.load(open(run_dir / "report" / "inference.json"))
    rows = {r["name"]: r for r in report["models"]}
    assert list(rows) == ["teacher", "student", "polarity/teacher", "polarity/seed-42"]
    assert report["seq_len"] == 128 and report["latency_batch"] == 1 and report["throughput_batch"] == 32
    for name, row in rows.items():
        assert row["error"] is None, row
        assert row["latency_ms"] > 0 and row["throughput_seq_s"] > 0 and row["max_abs_diff"] < 1e-3
        assert row["safetensors_bytes"] == os.path.getsize(run_dir / row["folder"] / "model.safetensors")
    assert rows["student"]["reference"] == "teacher" and rows["polarity/seed-42"]["reference"] == "polarity/teacher"
    assert abs(rows["student"]["sparsity"] - 0.9) < 1e-3
    assert rows["student"]["sparse_bytes"] < rows["teacher"]["sparse_bytes"]
    text = (run_dir / "report" / "README.md").read_text()
    section = text[text.index("## Inference"):text.index("## Wall time")]
    for name in rows:
        assert f"\n| {name} | " in section
    assert "CPU kernels:" in section and "no speed-up" in section
    client = MlflowClient(f"sqlite:///{run_dir}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    stage = next(r for r in runs if r.data.tags.get("pofa.stage") == "report")
    assert stage.data.metrics["inference.student.latency_ms"] == rows["student"]["latency_ms"]
    assert "inference.polarity.seed-42.throughput_speedup" in stage.data.metrics


EXPORTS = ("teacher/model", "student/model", "finetune/polarity/teacher/model", "finetune/polarity/seed-42/model",
           "finetune/polarity/model")


def test_every_export_has_a_model_card_the_hub_parser_reads(tiny_run):
    """Each export's README.md: metadata and model-index results that huggingface_hub reads back, the
    student's with the downstream mean and the inference figures; MLflow records the card's license."""
    from huggingface_hub import ModelCard, metadata_load
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts

    run_dir, _, _ = tiny_run
    for folder in EXPORTS:
        path = run_dir / folder / "README.md"
        card = ModelCard.load(path)
        assert card.data.license == "apache-2.0" and card.data.eval_results, folder
        assert metadata_load(path)["model-index"][0]["results"], folder
    student = ModelCard.load(run_dir / "student" / "model" / "README.md")
    mean = json.load(open(run_dir / "finetune" / "manifest.json"))["stats"]["results"]["polarity"]["accuracy"]
    results = {r.metric_name: r.metric_value for r in student.data.eval_results}
    assert results["accuracy (fine-tuned, pattern locked, mean of 1 seed)"] == pytest.approx(mean, abs=0.01)
    assert "sparsity-90" in student.data.tags and "| student | 0.900 |" in student.text  # inference row
    client = MlflowClient(f"sqlite:///{run_dir}/mlflow.db")
    experiments = [e.experiment_id for e in client.search_experiments()]
    logged = {m.name: m for m in client.search_logged_models(experiment_ids=experiments)}
    license_file = download_artifacts(artifact_uri=logged["student-model"].artifact_location + "/LICENSE.txt",
                                      dst_path=str(run_dir.parent / "license-check"))
    text = open(license_file).read()
    assert "License: apache-2.0" in text and "huggingface.co" not in text


def test_pofa_export_writes_a_folder_the_auto_classes_load(tiny_run):
    from huggingface_hub import ModelCard
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run_dir, _, _ = tiny_run
    out = run_dir.parent / "exported-seed"
    res = subprocess.run([sys.executable, "-m", "orchestrator.cli", "export", str(run_dir), "--stage",
                          "finetune/polarity/42", "--to", str(out)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    model = AutoModelForSequenceClassification.from_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(out))
    assert model.config.num_labels == 2 and json.load(open(out / "sparsity.json"))["global_sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert ModelCard.load(out / "README.md").data.eval_results[0].dataset_type == "polarity"


def test_training_honours_the_masking_contract(tiny_run):
    """The default tiny data (length 128, up to 20 predictions) give BERT's ~15% of MLM targets at
    every logged step of both pretraining stages."""
    run_dir, _, _ = tiny_run
    for stage in ("teacher", "student"):
        fractions = [json.loads(line)["data/masked_fraction"] for line in open(run_dir / stage / "metrics.jsonl")]
        assert fractions and all(0.12 <= f <= 0.16 for f in fractions), (stage, min(fractions), max(fractions))


def test_mlflow_parent_nested_runs_and_metrics(tiny_run):
    import mlflow
    from mlflow.tracking import MlflowClient

    run_dir, _, _ = tiny_run
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
    assert {2, 12, 22, 32} <= set(steps)  # a point at every mask update: the chart shows the cubic ramp
    assert any(k.startswith("sparsity/") and k != "sparsity/global" for k in student.data.metrics)
    assert children["preprocess"].data.metrics["instances_train"] > 0
    assert ids and parents[0].data.params["preprocess.max_seq_length"] == "128"
    # the parent carries the results runs are compared by; ids and timestamps are no metrics
    headline = parents[0].data.metrics
    for key in ("teacher/val/mlm_acc", "teacher/val/nsp_acc", "student/val/mlm_acc", "student/val/nsp_acc"):
        assert headline[key] == children[key.split("/")[0]].data.metrics[key.split("/", 1)[1]], key
    assert headline["student/sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert headline["finetune/polarity/accuracy"] == seed.data.metrics["eval/accuracy"]
    assert "data/batch" not in student.data.metrics and "data/masked_fraction" in student.data.metrics
    assert "data/masked_fraction" not in seed.data.metrics  # no MLM in fine-tuning
    assert not [k for k in children["finetune"].data.metrics if k.startswith("runs.")]
    # the pretraining data as MLflow datasets: on the parent and on the runs that trained on it
    for run in (parents[0], children["teacher"], student):
        data = {d.dataset.name: json.loads(d.dataset.profile) for d in run.inputs.dataset_inputs}
        assert data["pretraining-train"]["num_rows"] == children["preprocess"].data.metrics["instances_train"]
        assert data["pretraining-validation"]["num_rows"] == children["preprocess"].data.metrics["instances_validation"]


def test_rerun_skips_every_stage_and_reuses_the_parent_run(tiny_run):
    run_dir, _, _ = tiny_run
    before = json.load(open(run_dir / "tracking.json"))
    res = _pofa(run_dir, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    for stage in ("preprocess", "teacher", "student", "finetune", "report"):
        assert f"[{stage}] up to date (manifest matches): skipped" in res.stdout
    assert json.load(open(run_dir / "tracking.json")) == before


def test_finetune_keeps_the_students_pattern_and_records_results(tiny_run):
    run_dir, _, _ = tiny_run
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


def test_student_follows_the_references_lr_loss_and_regrows(tiny_run):
    """Every logged step (40, across a SIGTERM and a resume): the LR is the reference's rewinding schedule
    (policy window 0..20, rewound every 10 steps, not clamped), `loss` is the reference's combination of
    the four logged terms, and the mask updates brought pruned weights back."""
    from tests.pipelines import reference_pruneofa as ref

    run_dir, _, _ = tiny_run
    records = [json.loads(line) for line in open(run_dir / "student" / "metrics.jsonl")]
    train = {r["step"]: r for r in records if "loss/ce_mlm" in r}
    assert sorted(train) == list(range(1, 41))
    for step, r in train.items():  # logged after the update: its LR is the schedule's at step - 1
        assert r["lr"] == pytest.approx(1e-3 * ref.lr_multiplier(step - 1, 2, 40, 0, 20, 10), rel=1e-9), step
        assert r["loss"] == pytest.approx(0.5 * (r["loss/ce_mlm"] + r["loss/ce_nsp"])
                                          + 0.5 * (r["loss/kd_mlm"] + r["loss/kd_nsp"]), rel=1e-5), step
    assert max(r["lr"] for r in train.values()) > 1e-3  # a rewind above the peak LR: no clamp
    # schedule steps 0, 10, 20, 30 -> masks computed before updates 2, 12, 22, 32, logged with them
    regrown = {s: r["masks/regrown"] for s, r in train.items() if "masks/regrown" in r}
    assert sorted(regrown) == [2, 12, 22, 32]
    assert sum(regrown.values()) > 0
    # the sparsity curve at every mask update, global and per layer, not only at evaluations
    layers = [k for k in train[2] if k.startswith("sparsity/layer/")]
    assert layers and all(k in train[s] for s in regrown for k in layers)
    curve = [train[s]["sparsity/global"] for s in sorted(regrown)]
    assert curve == sorted(curve) and curve[-1] == pytest.approx(0.9, abs=1e-3)
    # the reference's cubic over the policy window 0..20 (then held): 0, 0.7875, 0.9, 0.9
    cubic = [0.9 * (1 - (1 - min(t, 20) / 20) ** 3) for t in (0, 10, 20, 30)]
    assert [train[s]["sparsity/target"] for s in sorted(regrown)] == pytest.approx(cubic, abs=1e-9)
    assert curve == pytest.approx(cubic, abs=1e-3)


def test_every_export_is_an_mlflow_model_with_its_metrics(tiny_run, monkeypatch):
    """Teacher, student and each fine-tuning run's export: MLflow models that pyfunc loads, each with its
    results; the task's export (its first seed's) registered as the recipe's tracking.register_models says."""
    import mlflow
    from mlflow import MlflowClient

    run_dir, _, _ = tiny_run
    store = f"sqlite:///{run_dir}/mlflow.db"
    client = MlflowClient(store)
    experiments = [e.experiment_id for e in client.search_experiments()]
    logged = {m.name: m for m in client.search_logged_models(experiment_ids=experiments)}
    assert {"teacher-model", "student-model", "finetune-polarity-teacher", "finetune-polarity-seed-42"} <= set(logged)
    metrics = {name: {m.key: m.value for m in model.metrics} for name, model in logged.items()}
    assert metrics["student-model"]["sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert "val/mlm_acc" in metrics["student-model"]
    seed = json.load(open(run_dir / "finetune" / "polarity" / "seed-42" / "result.json"))
    assert metrics["finetune-polarity-seed-42"]["accuracy"] == seed["metrics"]["accuracy"]
    assert metrics["finetune-polarity-seed-42"]["eval/accuracy"] == seed["metrics"]["accuracy"]  # its last step's
    assert "results.polarity.accuracy" not in metrics["finetune-polarity-seed-42"]  # no stage statistics
    assert logged["student-model"].params["student.pruning.schedule.final_sparsity"] == "0.9"
    assert logged["student-model"].tags["pofa.model_dir"] == "student/model"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    for name, model in logged.items():
        assert mlflow.pyfunc.load_model(f"models:/{model.model_id}") is not None, name
    pipe = mlflow.transformers.load_model("models:/tiny-polarity/1")
    assert pipe.task == "text-classification" and pipe("a good film")[0]["label"]
    version = MlflowClient(store).get_model_version("tiny-polarity", "1")
    assert version.source == f"models:/{logged['finetune-polarity-seed-42'].model_id}"


def test_a_copied_run_works_with_the_original_gone(tiny_run, tmp_path, monkeypatch):
    """`cp -r` of a finished run, the original gone from its place: `pofa status` and `plan` read the copy,
    MLflow lists its artifacts and loads its student, and the report's links resolve inside the copy."""
    import re

    import mlflow
    from mlflow import MlflowClient

    run_dir, _, _ = tiny_run
    copy = tmp_path / "shared" / "tiny-copy"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns(".lock"))
    aside = run_dir.parent / (run_dir.name + "-aside")
    os.rename(run_dir, aside)  # the original is gone from its path (kept aside for the module's other tests)
    try:
        status = subprocess.run([sys.executable, "-m", "orchestrator.cli", "status", str(copy)],
                                capture_output=True, text=True, timeout=120)
        assert status.returncode == 0, status.stderr
        for stage in ("preprocess", "teacher", "student", "finetune", "report"):
            assert f"{stage:<10s} done" in status.stdout, status.stdout
        plan = subprocess.run([sys.executable, "-m", "orchestrator.cli", "plan", "tiny", "--run-dir", str(copy)]
                              + [a for s in SHORT for a in ("--set", s)], capture_output=True, text=True, timeout=120)
        assert plan.returncode == 0 and plan.stdout.count("] skip: up to date") == 5, plan.stdout + plan.stderr

        store = f"sqlite:///{copy}/mlflow.db"
        client = MlflowClient(store)
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        student = next(r for r in runs if r.data.tags.get("pofa.stage") == "student")
        assert "sparsity" in {a.path for a in client.list_artifacts(student.info.run_id)}
        model = next(m for m in client.search_logged_models(experiment_ids=[student.info.experiment_id])
                     if m.name == "student-model")
        monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
        pipe = mlflow.transformers.load_model(f"models:/{model.model_id}")
        assert pipe.task == "fill-mask" and pipe("the [MASK] of the city")

        report = (copy / "report" / "README.md").read_text()
        links = re.findall(r"\]\((?!https?:)([^)]+)\)", report)
        assert any(link.endswith("student/model") for link in links)
        for link in links:
            assert (copy / "report" / link).exists(), link
        assert str(run_dir) not in report
    finally:
        os.rename(aside, run_dir)
