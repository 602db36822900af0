"""Teacher stage on real Ray Train (2 workers) + real DeepSpeed (ZeRO-2, gloo on CPU), tiny BERT:
a worker fails mid-run, Ray Train restarts the group from the last checkpoint, the stage completes
and exports a model the Auto classes load. The replayed step must reproduce its loss to 1e-5."""
from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoModelForMaskedLM, AutoModelForPreTraining, AutoModelForQuestionAnswering

from pipelines.models.config import BertInit, ModelConfig
from pipelines.training.config import TrainConfig
from tests.workers.train_fixture import FileTracker, committed_steps, make_preprocess, read_losses, start_ray, tiny_train
from workers.run_layout import RunLayout
from workers.train.driver import run_training
from workers.train.spec import FaultInjection, TrainSpec

pytestmark = pytest.mark.integration  # Ray, DeepSpeed, a server or a subprocess pipeline

MODEL = ModelConfig(init=BertInit(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128))


def teacher_spec(run_dir: str, **train) -> TrainSpec:
    return TrainSpec(stage="teacher", layout=RunLayout.open(run_dir), train=TrainConfig(**tiny_train(**train)), model=MODEL,
                     seed=11, tracker=FileTracker(os.path.join(run_dir, "tracker.jsonl")), progress=False)


@pytest.fixture(scope="module")
def cluster():
    start_ray()


@pytest.fixture(scope="module")
def failed_once(cluster, tmp_path_factory):
    """6 steps, checkpoints every 2 (last 2 kept); rank 1 raises at the start of step 4 (after
    step 3 was trained and logged), max_failures=1: the restart replays step 3 from step-2."""
    run_dir = str(tmp_path_factory.mktemp("teacher"))
    make_preprocess(run_dir)
    spec = teacher_spec(run_dir, max_failures=1)
    spec.fault = FaultInjection(step=3, rank=1, marker=os.path.join(run_dir, "fault-once"))
    result = run_training(spec, echo=False)
    return spec, result


def test_worker_failure_restarts_from_the_last_checkpoint(failed_once):
    spec, result = failed_once
    assert os.path.exists(spec.fault.marker)  # the fault did fire
    assert result.final_step == 6
    assert result.start_steps == [0, 2]  # restarted from the step-2 checkpoint
    losses = read_losses(spec.run.metrics)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert len(losses[3]) == 2  # trained before the failure and again after the restart
    assert losses[3][0] == pytest.approx(losses[3][1], abs=1e-5)
    assert all(len(losses[s]) == 1 for s in (1, 2, 4, 5, 6))  # nothing else repeated or skipped


def test_teacher_exports_a_model_the_auto_classes_load(failed_once):
    spec, result = failed_once
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(os.listdir(result.model_dir))
    for auto in (AutoModelForPreTraining, AutoModelForMaskedLM, AutoModelForQuestionAnswering):
        model = auto.from_pretrained(result.model_dir)
        assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 2
    mlm = AutoModelForMaskedLM.from_pretrained(result.model_dir)
    assert torch.equal(mlm.cls.predictions.decoder.weight, mlm.bert.embeddings.word_embeddings.weight)
    # the export holds the trained weights, not the initial ones
    from pipelines.models.build import build_pretraining_model

    init = build_pretraining_model(MODEL, vocab_size=mlm.config.vocab_size, seed=spec.seed_value)
    trained = AutoModelForPreTraining.from_pretrained(result.model_dir)
    name = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.allclose(init.get_parameter(name), trained.get_parameter(name))


def test_metrics_checkpoints_and_tracking(failed_once):
    spec, result = failed_once
    assert {"val/loss", "val/mlm_acc", "val/nsp_acc", "loss", "lr", "throughput/samples_per_s",
            "data/masked_fraction"} <= set(result.metrics)
    assert 0.0 <= result.metrics["val/nsp_acc"] <= 1.0
    with open(spec.run.metrics) as f:  # the masking contract made visible, at every step
        fractions = [json.loads(line)["data/masked_fraction"] for line in f]
    assert len(fractions) == 7 and all(0.12 <= x <= 0.2 for x in fractions)
    assert committed_steps(spec) == [6, 4]  # last K=2 kept
    ray_run = os.path.join(spec.run.ray_storage, spec.run.ray_run_name)
    pointers = sorted(d for d in os.listdir(ray_run) if d.startswith("step-"))
    assert pointers[-1] == "step-00000006"  # reported to Ray Train
    with open(os.path.join(ray_run, pointers[-1], "pofa_checkpoint.json")) as f:
        assert json.load(f)["step"] == 6
    # only rank 0 logged to the injected tracker: one record per trained step
    with open(os.path.join(spec.layout.root, "tracker.jsonl")) as f:
        steps = [json.loads(line)["step"] for line in f if '"loss"' in line]
    assert steps == [1, 2, 3, 3, 4, 5, 6]


def test_bad_input_fails_before_any_worker_starts(cluster, tmp_path):
    run_dir = str(tmp_path)
    with pytest.raises(ValueError, match="run the preprocess stage first"):
        run_training(teacher_spec(run_dir), echo=False)
    make_preprocess(run_dir, documents=20)
    with pytest.raises(ValueError, match="global_batch_size=64"):
        run_training(teacher_spec(run_dir, global_batch_size=64), echo=False)
    with pytest.raises(ValueError, match="CPUs"):
        run_training(teacher_spec(run_dir, num_workers=8, global_batch_size=32), echo=False)
    spec = teacher_spec(run_dir)
    spec.model = ModelConfig(name=os.path.join(run_dir, "no-such-model"))
    with pytest.raises(ValueError, match="model.name="):
        run_training(spec, echo=False)
    assert not os.path.exists(spec.run.checkpoints)


def test_sigterm_to_a_worker_checkpoints_that_step_and_the_next_attempt_resumes(cluster, tmp_path) -> None:
    """As a pod eviction does to one training process: its rank sees the notice, every rank stops after
    the same step, the step is committed, and the stage goes on from it (the driver was not told)."""
    import signal
    import threading
    import time

    import psutil

    run_dir = str(tmp_path)
    make_preprocess(run_dir)
    spec = teacher_spec(run_dir, max_steps=16, checkpoint_every=100, eval_every=100)

    def evict_one_worker() -> None:
        deadline = time.time() + 300
        while time.time() < deadline:
            if os.path.exists(spec.run.metrics) and len(open(spec.run.metrics).readlines()) >= 5:
                # this session's Ray runs as our descendants: its Train workers, by process title
                workers = [p for p in psutil.Process().children(recursive=True)
                           if "RayTrainWorker" in " ".join(p.cmdline())]
                if workers:
                    os.kill(workers[-1].pid, signal.SIGTERM)
                    return
            time.sleep(0.1)

    evictor = threading.Thread(target=evict_one_worker, daemon=True)
    evictor.start()
    result = run_training(spec, echo=False)
    evictor.join()
    assert result.final_step == 16
    preempted_at = result.start_steps[1]
    assert len(result.start_steps) == 2 and 5 <= preempted_at < 16  # not a periodic checkpoint: there is none
    assert committed_steps(spec) == [16, preempted_at]
    assert sorted(read_losses(spec.run.metrics)) == list(range(1, 17))  # nothing repeated or skipped


def test_a_rerun_that_resumes_at_the_last_step_keeps_its_final_metrics(failed_once) -> None:
    """Stopped between the final checkpoint and the stage's end (a SIGTERM the chaos test hit): the
    rerun resumes at the last step, trains nothing, and reports that step's metrics, not an empty record."""
    spec, first = failed_once
    again = run_training(spec, echo=False)
    assert again.final_step == 6 and again.start_steps[-1] == 6
    for key in ("val/mlm_acc", "val/nsp_acc", "val/loss", "loss"):
        assert again.metrics[key] == first.metrics[key], key
    assert sorted(read_losses(spec.run.metrics)) == [1, 2, 3, 4, 5, 6]  # no step trained twice
