"""What a finished stage adds to MLflow for comparing runs: measured statistics only, the pretraining data
as datasets (source, digest, split sizes) in a real store, and a registry key checked before any work."""
from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient

from orchestrator.job_graph import check_register
from orchestrator.recipe.load import load_recipe
from orchestrator.tracking import TrackingConfig, TrackingSession
from orchestrator.tracking.datasets import CONTEXT_TAG, pretraining_datasets
from orchestrator.tracking.results import stage_metrics
from workers.stage_outputs import PreprocessOutput, StageManifest

SOURCE = {"kind": "wikipedia_xml", "path": "pkg://gensim/test/test_data/wiki.bz2", "name": None}


def preprocess_manifest(train_sha: str = "a" * 64) -> StageManifest:
    output = PreprocessOutput.model_validate({
        "splits": {"train": {"shards": [{"name": "shard-0.parquet", "rows": 90, "sha256": train_sha}], "rows": 90},
                   "validation": {"shards": [{"name": "shard-0.parquet", "rows": 10, "sha256": "b" * 64}],
                                  "rows": 10}},
        "tokenizer": "preprocess/tokenizer", "max_seq_length": 128, "vocab_size": 4000,
        "masking": {"kind": "dynamic", "masked_lm_prob": 0.15, "max_predictions_per_seq": 20}})
    return StageManifest(format=2, stage="preprocess", status="complete", fingerprint="f", inputs={},
                         config={"preprocess": {"source": SOURCE}}, stats={"documents_train": 27},
                         outputs={"train/shard-0.parquet": train_sha, "validation/shard-0.parquet": "b" * 64,
                                  "tokenizer/tokenizer.json": "c" * 64},
                         output=output.model_dump(mode="json"), started=0.0, finished=1.0, wall_time_s=1.0,
                         pofa_version="test")


def test_stage_metrics_are_measurements_not_ids_or_times():
    stats = {"fingerprint": "1234", "instances_train": 90, "masking": "dynamic", "masked_token_fraction": None,
             "results": {"polarity": {"accuracy": 71.5, "seeds": {"42": {"accuracy": 71.5}}}},
             "runs": {"polarity/seed-42": {"started": 1.7e9, "finished": 1.7e9, "nodes": ["n1"]}}}
    assert stage_metrics(stats) == {"instances_train": 90.0, "results.polarity.accuracy": 71.5,
                                    "results.polarity.seeds.42.accuracy": 71.5}


def test_pretraining_data_is_logged_as_datasets(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    records = pretraining_datasets(preprocess_manifest())
    assert [r.name for r in records] == ["pretraining-train", "pretraining-validation"]
    other = pretraining_datasets(preprocess_manifest(train_sha="d" * 64))
    assert records[0].digest != other[0].digest and records[1].digest == other[1].digest  # by the shards' bytes

    session = TrackingSession.open(TrackingConfig(), tmp_path / "run")
    session.start_stage("preprocess")
    session.log_datasets(records, key="preprocess")
    session.log_datasets(records)
    session.end_stage("preprocess")
    session.finish()
    client = MlflowClient(session.uri)
    for run_id in (session.stage_run_id("preprocess"), session.parent_run_id):
        inputs = {d.dataset.name: d for d in client.get_run(run_id).inputs.dataset_inputs}
        train = inputs["pretraining-train"]
        assert json.loads(train.dataset.profile)["num_rows"] == 90 and train.dataset.digest == records[0].digest
        assert json.loads(train.dataset.source)["uri"] == SOURCE["path"]  # the recipe's source, no local path
        assert {t.key: t.value for t in train.tags}[CONTEXT_TAG] == "training"
        assert json.loads(inputs["pretraining-validation"].dataset.profile)["num_rows"] == 10


def test_register_models_names_exports_and_is_checked_before_any_work():
    with pytest.raises(ValueError, match="tracking.register_models: 'studnet' is not an export"):
        TrackingConfig(register_models={"studnet": "tiny-sparse"})
    recipe = load_recipe("tiny", ["tracking.register_models.student=tiny-sparse"])
    assert recipe.tracking.register_models == {"student": "tiny-sparse"}
    check_register(recipe)
    wrong = load_recipe("tiny", ["tracking.register_models.finetune/sst2=tiny-sst2"])
    with pytest.raises(ValueError, match="'finetune/sst2' is not an export of this recipe.*finetune/polarity"):
        check_register(wrong)
