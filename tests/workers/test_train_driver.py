"""Driver-side pieces without a cluster: pre-flight errors, tracking that never stops training,
the end-of-stage summary."""
from __future__ import annotations

import json
import os

import pytest

from pipelines.models.config import ModelConfig
from pipelines.training.config import TrainConfig
from tests.workers.train_fixture import make_preprocess, make_teacher_export, tiny_train
from workers.run_layout import RunLayout
from workers.run_records import CheckpointManifest, TrainSummary, dump_record, write_record
from workers.train.checkpointer import FORMAT, MANIFEST
from workers.train.context import SafeTracker
from workers.train.preflight import preflight
from workers.train.progress import format_summary
from workers.train.spec import TrainSpec


def spec(run_dir: str, **train) -> TrainSpec:
    return TrainSpec(stage="teacher", layout=RunLayout.open(run_dir), train=TrainConfig(**tiny_train(**train)),
                     model=ModelConfig())


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("run"))
    make_preprocess(path, documents=20)  # about 40 training rows
    return path


def test_missing_preprocess_output_is_named(tmp_path):
    with pytest.raises(ValueError, match="preprocess/manifest.json is missing: run the preprocess stage first"):
        preflight(spec(str(tmp_path)))


def test_batch_larger_than_the_data(run_dir):
    with pytest.raises(ValueError, match="global_batch_size=64"):
        preflight(spec(run_dir, global_batch_size=64))


def test_unknown_model(run_dir):
    bad = spec(run_dir)
    bad.model = ModelConfig(name=os.path.join(run_dir, "no-such-model"))
    with pytest.raises(ValueError, match="model.name="):
        preflight(bad)


def test_student_needs_the_teacher_and_its_tokenizer(run_dir, tmp_path):
    layout = RunLayout.open(run_dir)
    with pytest.raises(ValueError, match="init_dir"):
        TrainSpec(stage="student", layout=layout, train=TrainConfig(**tiny_train()))
    student = TrainSpec(stage="student", layout=layout, train=TrainConfig(**tiny_train()),
                        init_dir=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="train the teacher first"):
        preflight(student)
    # a teacher exported with another vocabulary
    other = str(tmp_path / "other")
    make_preprocess(other, documents=6)
    teacher = make_teacher_export(other)
    tok = json.load(open(os.path.join(teacher, "tokenizer.json")))
    tok["model"]["vocab"] = {f"x{i}": i for i in range(len(tok["model"]["vocab"]))}
    json.dump(tok, open(os.path.join(teacher, "tokenizer.json"), "w"))
    student.init_dir = teacher
    with pytest.raises(ValueError, match="another tokenizer"):
        preflight(student)


def test_what_cannot_resume_on_another_worker_count_is_refused(run_dir, tmp_path):
    s = spec(run_dir, num_workers=2)
    step = s.run.checkpoint_step(2)
    manifest = CheckpointManifest(format=FORMAT, step=2, world_size=4, created=0.0, parts=[], rank_parts=[], zero_stage=2,
                                  files={})
    s.layout.store.write_json(s.layout.rel(os.path.join(step, MANIFEST)), dump_record(manifest))
    try:
        s.elastic = False  # a data cursor per worker, as fine-tuning keeps
        with pytest.raises(ValueError, match="written by 4 workers at ZeRO-2.*resumes only with num_workers=4"):
            preflight(s)
        s.elastic = True
        s.layout.store.write_json(s.layout.rel(os.path.join(step, MANIFEST)),
                                  dump_record(manifest.model_copy(update={"zero_stage": 0})))
        with pytest.raises(ValueError, match="written at ZeRO-0; resuming it at ZeRO-2 is not supported"):
            preflight(s)
    finally:
        import shutil

        shutil.rmtree(s.run.root)


def test_preflight_needs_a_ray_cluster(run_dir, monkeypatch):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # whatever other test modules started
    with pytest.raises(RuntimeError, match="ray.init"):
        preflight(spec(run_dir))


class BrokenTracker:
    calls = 0

    def log_metrics(self, metrics, step):
        BrokenTracker.calls += 1
        raise ConnectionError("tracking server down")

    def log_artifact(self, local_path, artifact_path=None):
        raise ConnectionError("down")

    def set_tags(self, tags):
        raise ConnectionError("down")

    def flush(self):
        raise ConnectionError("down")


def test_a_tracking_outage_never_stops_training(tmp_path, caplog):
    tracker = SafeTracker(BrokenTracker(), str(tmp_path / "metrics.jsonl"), enabled=True)
    for step in (1, 2, 3):
        tracker.log({"loss": 1.0 / step}, step)
    tracker.flush()
    tracker.tags({"a": "b"})
    assert BrokenTracker.calls == 3
    lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in lines] == [1, 2, 3]  # the local record still has everything
    assert sum("tracking failed" in r.message for r in caplog.records) == 1  # warned once
    silent = SafeTracker(BrokenTracker(), str(tmp_path / "other.jsonl"), enabled=False)  # ranks != 0
    silent.log({"loss": 1.0}, 1)
    assert not os.path.exists(tmp_path / "other.jsonl")


def test_a_batch_digest_stays_in_the_local_record_and_is_no_tracked_metric(tmp_path):
    """`data/batch` identifies the samples (metrics.jsonl keeps it for comparing runs); plotted it is noise."""
    from workers.tracking import NullTracker

    sent: list[dict] = []

    class Recording(NullTracker):
        def log_metrics(self, metrics, step, timestamp_ms=None):
            sent.append(dict(metrics))

    tracker = SafeTracker(Recording(), str(tmp_path / "metrics.jsonl"), enabled=True)
    tracker.log({"loss": 0.5, "data/batch": 12345.0}, 1)
    assert sent == [{"loss": 0.5}]
    assert json.loads(open(tmp_path / "metrics.jsonl").read())["data/batch"] == 12345.0


def test_summary_fits_one_screen():
    summary = TrainSummary(stage="student", final_step=6, max_steps=6, start_step=2, world_size=2, global_batch_size=16,
                           zero_stage=2, precision="fp32", model_dir="/r/student/model", checkpoint="/r/c/step-6",
                           metrics={"loss": 2.5, "val/mlm_acc": 0.1, "sparsity/global": 0.9})
    text = format_summary(summary, [0, 2], 12.5)
    assert "student finished: step 6 of 6" in text and "[0, 2]" in text
    assert "sparsity/global=0.9000" in text and "/r/student/model" in text
    assert len(text.splitlines()) <= 10


def test_too_few_resources_fail_at_once_or_after_the_wait(run_dir, ray_local):
    import time

    short = spec(run_dir, num_workers=4, cpus_per_worker=64, micro_batch_size=1, global_batch_size=16)
    with pytest.raises(ValueError, match=r"needs 256(\.0)? CPUs; the Ray cluster has .*set ray.resource_wait_s"):
        preflight(short)
    short.resource_wait_s = 1.5
    started = time.monotonic()
    with pytest.raises(ValueError, match=r"after waiting 1.5 s for nodes to join"):
        preflight(short)
    assert time.monotonic() - started >= 1.5  # it did wait for nodes that never joined


class DyingAtLaunch:
    """A trainer whose workers die between the group's start and the train function's launch `deaths`
    times, the way Ray Train 2.60 leaves it: a ControllerError its policy does not retry, and the group's
    placement group still holding its CPUs. Then it finishes."""

    fits = 0
    left: list = []  # the placement groups the failed starts left

    def __init__(self, spec, deaths: int) -> None:
        self.spec, self.deaths = spec, deaths

    def fit(self) -> None:
        import ray
        from ray.exceptions import RayActorError
        from ray.train import ControllerError
        from ray.util.placement_group import placement_group

        DyingAtLaunch.fits += 1
        if DyingAtLaunch.fits <= self.deaths:
            group = placement_group([{"CPU": 1}, {"CPU": 1}])  # both CPUs of the test instance
            ray.get(group.ready(), timeout=60)
            DyingAtLaunch.left.append(group)
            raise ControllerError(RayActorError())
        os.makedirs(self.spec.run.root, exist_ok=True)
        write_record(TrainSummary(stage=self.spec.run.name, final_step=2, max_steps=2, start_step=0, world_size=2,
                                  global_batch_size=2, zero_stage=0, precision="fp32", model_dir=self.spec.run.model,
                                  checkpoint=None, metrics={}), self.spec.run.summary)


@pytest.mark.integration
@pytest.mark.parametrize("max_failures, deaths, fits", [(2, 2, 3), (1, 2, 2), (0, 1, 1), (-1, 3, 4)])
def test_a_worker_that_dies_while_the_group_starts_counts_as_a_failure(run_dir, ray_local, monkeypatch, max_failures,
                                                                        deaths, fits):
    from ray.train import ControllerError

    from workers.train import driver

    s = spec(run_dir, max_failures=max_failures, retry_backoff_s=0.5)
    DyingAtLaunch.fits, DyingAtLaunch.left = 0, []
    monkeypatch.setattr(driver, "build_trainer", lambda sp, loop: DyingAtLaunch(sp, deaths))
    monkeypatch.setattr(driver, "prepare_resume", lambda sp: None)
    monkeypatch.setenv(driver.PRIVATE_INSTANCE_ENV, "a-local-instance-pofa-started")
    waits: list[float] = []
    try:
        if deaths > max_failures >= 0:
            with pytest.raises(ControllerError):
                driver.fit_with_retries(s, loop=None, sleep=waits.append)
        else:
            driver.fit_with_retries(s, loop=None, sleep=waits.append)
        assert DyingAtLaunch.fits == fits
        assert waits == [0.5, 1.0, 2.0][:fits - 1]  # the stage's backoff, doubling
        retried = DyingAtLaunch.left[:fits - 1]  # each retry first freed the CPUs the failed start held
        assert all(ray_local.util.placement_group_table(g)["state"] == "REMOVED" for g in retried)
        assert not driver.died_while_starting(ControllerError(ValueError("a bug in a callback")))  # not retried
    finally:
        for group in DyingAtLaunch.left:
            ray_local.util.remove_placement_group(group)


@pytest.mark.integration
def test_a_start_death_is_not_retried_where_removing_groups_is_unsafe(run_dir, ray_local, monkeypatch):
    """On a cluster pofa did not start (another driver may be creating groups), the attempt fails as it
    is and the group is left alone: the rerun resumes."""
    from ray.train import ControllerError

    from workers.train import driver

    s = spec(run_dir, max_failures=3, retry_backoff_s=0.5)
    DyingAtLaunch.fits, DyingAtLaunch.left = 0, []
    monkeypatch.setattr(driver, "build_trainer", lambda sp, loop: DyingAtLaunch(sp, 1))
    monkeypatch.setattr(driver, "prepare_resume", lambda sp: None)
    monkeypatch.delenv(driver.PRIVATE_INSTANCE_ENV, raising=False)
    try:
        with pytest.raises(ControllerError):
            driver.fit_with_retries(s, loop=None, sleep=lambda _: None)
        assert DyingAtLaunch.fits == 1
        assert ray_local.util.placement_group_table(DyingAtLaunch.left[0])["state"] == "CREATED"
    finally:
        for group in DyingAtLaunch.left:
            ray_local.util.remove_placement_group(group)


def test_a_group_that_cannot_start_is_retried_as_often_as_a_failed_one_not_forever(run_dir):
    from workers.train.driver import build_trainer

    config = build_trainer(spec(run_dir, max_failures=2)).run_config.failure_config
    assert config.max_failures == 2 and config.controller_failure_limit == 2  # Ray's default: -1, forever
