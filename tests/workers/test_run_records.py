"""Run files through their declared models (workers/run_records.py): each model reads back what the
real producer writes, byte for byte where the producer writes through it; a missing or invalid field
is one error naming the file, the field and the stage to redo; older files (fields added since) load;
a torn last JSON Lines line is dropped, not an error."""
from __future__ import annotations

import io
import json
import os
import time
from types import SimpleNamespace
from typing import Any

import pytest

from orchestrator.console import Console
from orchestrator.job_graph import _report_failure
from orchestrator.stall_budget import longest_startup
from workers.run_layout import RunLayout
from pipelines.data.config import PreprocessConfig
from pipelines.data.sources import read_units
from tests.workers.test_train_checkpoint import Trainer, _saved
from tests.workers.train_fixture import make_preprocess
from workers.preprocess.tasks import ShardProcessor, read_shards, shard_results, unit_batch
from workers.run_records import (AttemptRecord, CheckpointManifest, FailureRecord, RecordError, ShardRecord,
                                 TrainSummary, read_record, read_record_lines, write_record)
from workers.stage_outputs import load_manifest
from workers.train import base_worker
from workers.train.base_worker import BaseWorker
from workers.train.checkpointer import MANIFEST, CheckpointError, read_manifest
from workers.train.driver import _read_summary
from workers.train.progress import format_summary


def _bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _drop(path: str, key: str) -> None:
    """The file as an older or damaged writer would leave it: `key` missing."""
    raw = json.loads(_bytes(path))
    del raw[key]
    with open(path, "w") as f:
        json.dump(raw, f)


# -- MANIFEST.json ---------------------------------------------------------------------------------------
def test_a_real_checkpoint_commit_reads_back_as_its_model_and_rewrites_the_same_bytes(tmp_path) -> None:
    layout = RunLayout.open(str(tmp_path))
    _saved(layout, [2])
    run = layout.training("student")
    path = os.path.join(run.checkpoint_step(2), MANIFEST)
    manifest = read_manifest(layout, layout.rel(run.checkpoint_step(2)), run.stage)
    assert isinstance(manifest, CheckpointManifest) and manifest.step == 2 and manifest.world_size == 1
    assert manifest.rank_parts == ["data", "rng"] and manifest.zero_stage is None  # the toy passes no meta
    assert all(len(f.sha256) == 64 for f in manifest.files.values())
    again = str(tmp_path / "again.json")
    write_record(manifest, again)
    assert _bytes(again) == _bytes(path)  # no key added (no null meta) or lost


def test_a_manifest_missing_a_field_names_file_field_and_stage_and_is_not_set_aside(tmp_path) -> None:
    layout = RunLayout.open(str(tmp_path))
    _saved(layout, [2])
    path = os.path.join(layout.training("student").checkpoint_step(2), MANIFEST)
    _drop(path, "world_size")
    with pytest.raises(CheckpointError) as err:
        Trainer(layout).checkpointer.restore()
    text = str(err.value)
    assert path in text and "field world_size is missing" in text and "redo the student stage" in text
    assert len(text.splitlines()) == 1 and os.path.exists(path)  # one line; the checkpoint stays where it is


# -- attempts.jsonl ----------------------------------------------------------------------------------------
def _resume(layout: RunLayout, step: int) -> dict[str, str]:
    """BaseWorker.resume, the attempts file's producer, on a worker without an engine (rank 0, no Ray)."""
    os.makedirs(layout.training("student").checkpoints, exist_ok=True)  # as the worker's __init__ does
    tracker = SimpleNamespace(seen={})
    tracker.tags = tracker.seen.update
    worker = SimpleNamespace(checkpointer=SimpleNamespace(restore=lambda: (step, f"ckpt-{step}") if step else None),
                             timings={}, in_ray=False, is_rank0=True, layout=layout,
                             run=layout.training("student"), step=step, last_checkpoint=None,
                             _started=time.perf_counter(), tracker=tracker)
    assert BaseWorker.resume(worker) == step  # type: ignore[arg-type]
    return tracker.seen


def test_attempts_read_back_as_written_and_a_torn_last_line_is_dropped(tmp_path) -> None:
    layout = RunLayout.open(str(tmp_path))
    run = layout.training("student")
    _resume(layout, 0)
    with open(run.attempts, "a") as f:
        f.write('{"start_step": 3, "checkp')  # a kill mid-write
    tags = _resume(layout, 4)
    assert tags["student.attempts"] == "2"  # the torn line was cut before appending
    attempts = read_record_lines(AttemptRecord, run.attempts, run.stage)
    assert [(a.start_step, a.checkpoint, a.nodes) for a in attempts] == [(0, None, ["local"]), (4, "ckpt-4", ["local"])]
    assert all(a.startup_s is not None and a.startup_s >= 0 for a in attempts)
    assert longest_startup(layout, ["student"]) == (max(a.startup_s for a in attempts), run.attempts)  # stall budget
    lines = _bytes(run.attempts).decode().splitlines()
    assert json.loads(lines[1]) == {"start_step": 4, "checkpoint": "ckpt-4", "time": attempts[1].time,
                                    "nodes": ["local"], "startup_s": attempts[1].startup_s}  # today's keys
    with open(run.attempts, "a") as f:
        f.write('{"start_step": 9')
    assert len(read_record_lines(AttemptRecord, run.attempts, run.stage, repair=False)) == 2
    assert _bytes(run.attempts).endswith(b'{"start_step": 9')  # a reader that must not repair leaves it


def test_an_attempt_from_before_nodes_and_startups_were_recorded_loads(tmp_path) -> None:
    path = str(tmp_path / "attempts.jsonl")
    with open(path, "w") as f:
        f.write(json.dumps({"start_step": 0, "checkpoint": None, "time": 1.0}) + "\n")
    [old] = read_record_lines(AttemptRecord, path, "teacher")
    assert old.nodes == [] and old.startup_s is None


def test_an_attempt_line_missing_a_field_names_file_line_field_and_stage(tmp_path) -> None:
    path = str(tmp_path / "attempts.jsonl")
    with open(path, "w") as f:
        f.write(json.dumps({"start_step": 0, "checkpoint": None, "time": 1.0}) + "\n")
        f.write(json.dumps({"checkpoint": None, "time": 2.0}) + "\n")
    with pytest.raises(RecordError, match=rf"{path} line 2: field start_step is missing; redo the finetune stage"):
        read_record_lines(AttemptRecord, path, "finetune")


# -- train_summary.json ------------------------------------------------------------------------------------
class _Worker:
    """Stands in for a training worker in the real worker loop (`_run_worker`): two steps, no engine."""

    def __init__(self, layout: RunLayout) -> None:
        self.layout, self.run = layout, layout.training("student")
        self.rank, self.world, self.is_rank0, self.step = 0, 1, True, 0
        self.timings: dict[str, Any] = {"checkpoint_save_s": []}
        self._started = time.perf_counter()
        self.last_checkpoint, self.last_metrics, self.preempt_requested = None, {}, False
        self.tracker = SimpleNamespace(log=lambda m, s: None, artifact=lambda *a: None, flush=lambda: None)
        os.makedirs(self.run.root, exist_ok=True)

    def resume(self) -> int:
        return self.step

    def train_step(self) -> dict[str, float]:
        self.step += 1
        return {"loss": 2.0 / self.step, "lr": 1e-3}

    def evaluate(self) -> dict[str, float]:
        return {"val/loss": float("nan")}  # a diverged run's value must survive the round trip

    def save_checkpoint(self, metrics: dict[str, float]) -> None:
        self.last_checkpoint = f"ckpt-{self.step}"

    def export(self) -> dict[str, Any]:
        return {"global_sparsity": 0.9}

    def summary_extra(self) -> dict[str, Any]:
        return {"teacher_frozen": True}

    def push_run_files(self) -> None:
        pass


def test_the_worker_loops_summary_reads_back_through_the_driver(tmp_path, monkeypatch, capsys) -> None:
    layout = RunLayout.open(str(tmp_path))
    monkeypatch.setattr(base_worker.ray.train.torch, "get_device", lambda: "cpu")
    train = SimpleNamespace(max_steps=2, eval_every=2, checkpoint_every=2, global_batch_size=8, zero_stage=2,
                            precision="fp32")
    spec = SimpleNamespace(train=train, progress=False, fault=None, layout=layout, run=layout.training("student"))
    ctx = SimpleNamespace(get_world_rank=lambda: 0, get_world_size=lambda: 1)
    base_worker._run_worker(lambda rank, world, device: _Worker(layout), spec, ctx,
                            SimpleNamespace(beat=lambda what: None))
    summary = _read_summary(spec)
    assert isinstance(summary, TrainSummary)
    assert (summary.final_step, summary.checkpoint, summary.export_sparsity) == (2, "ckpt-2", 0.9)
    assert summary.teacher_frozen is True
    assert summary.quantization is None and not summary.preempted and summary.metrics["val/loss"] != 0
    assert set(json.loads(_bytes(spec.run.summary))) == {  # the keys the dict-built summary had
        "stage", "final_step", "max_steps", "preempted", "start_step", "world_size", "global_batch_size", "zero_stage",
        "precision", "model_dir", "checkpoint", "metrics", "export_sparsity", "quantization", "attempt_elapsed_s",
        "timings", "teacher_frozen"}
    again = str(tmp_path / "again.json")
    write_record(summary, again)
    assert _bytes(again) == _bytes(spec.run.summary)
    text = format_summary(summary, [0], 1.25)
    assert text.splitlines()[:2] == ["== student finished: step 2 of 2 (attempts started at steps [0]) in 1.2s",
                                     "   workers 1  global batch 8  ZeRO 2  fp32"]
    assert "   last checkpoint: ckpt-2" in text


def test_a_summary_from_before_preemption_and_the_frozen_teacher_check_loads(tmp_path) -> None:
    path = str(tmp_path / "train_summary.json")
    with open(path, "w") as f:
        json.dump({"stage": "teacher", "final_step": 4, "max_steps": 4, "start_step": 0, "world_size": 2,
                   "global_batch_size": 8, "zero_stage": 2, "precision": "fp32", "model_dir": "m",
                   "checkpoint": "c", "metrics": {"loss": 1.0}}, f)
    summary = read_record(TrainSummary, path, "teacher")
    assert not summary.preempted and summary.teacher_frozen is None and summary.timings == {}


def test_a_summary_missing_a_field_names_file_field_and_stage(tmp_path) -> None:
    path = str(tmp_path / "train_summary.json")
    with open(path, "w") as f:
        json.dump({"stage": "student", "final_step": 4}, f)
    with pytest.raises(RecordError) as err:
        read_record(TrainSummary, path, "student")
    assert str(err.value).startswith(f"{path}: field max_steps is missing; ")
    assert str(err.value).endswith("redo the student stage: pofa run RECIPE --stages student --force")
    with open(path, "w") as f:
        f.write('{"stage": "stud')
    with pytest.raises(RecordError, match="not readable JSON.*redo the student stage"):
        read_record(TrainSummary, path, "student")


# -- <stage>/failure.json ----------------------------------------------------------------------------------
def test_a_reported_failure_reads_back_as_its_model(tmp_path) -> None:
    layout = RunLayout.open(str(tmp_path))
    logs = SimpleNamespace(record_failure=lambda exc: "logs/teacher/attempt-1/driver.log")
    _report_failure(Console(io.StringIO(), tty=False), logs, layout, "teacher", RuntimeError("out of memory"))
    failure = read_record(FailureRecord, layout.failure("teacher"), "teacher")
    assert (failure.error, failure.type, failure.log) == ("RuntimeError: out of memory", "RuntimeError",
                                                           "logs/teacher/attempt-1/driver.log")
    _drop(layout.failure("teacher"), "error")
    with pytest.raises(RecordError, match="field error is missing; redo the teacher stage"):
        read_record(FailureRecord, layout.failure("teacher"), "teacher")


# -- preprocess/.shards/<id>.json ---------------------------------------------------------------------------
def test_shard_records_read_back_and_a_bad_one_is_named_and_made_again(tmp_path, caplog) -> None:
    layout = make_preprocess(str(tmp_path / "run"), documents=40, shards=2)  # the real ShardProcessor wrote them
    folder = layout.path("preprocess", ".shards")
    paths = sorted(os.path.join(folder, name) for name in os.listdir(folder))
    records = [read_record(ShardRecord, path, "preprocess") for path in paths]
    assert len(records) == 2 and all(r.shards["train"].rows > 0 and r.stats.tokens > 0 for r in records)
    again = str(tmp_path / "again.json")
    write_record(records[0], again)
    assert _bytes(again) == _bytes(paths[0])
    _drop(paths[0], "stats")
    with pytest.raises(RecordError, match=f"{paths[0]}: field stats is missing; redo the preprocess stage"):
        read_record(ShardRecord, paths[0], "preprocess")
    cfg = PreprocessConfig.model_validate(load_manifest(layout, "preprocess").config)  # type: ignore[union-attr]
    processor = ShardProcessor(cfg.model_dump_json(), 0, layout)
    rows = read_shards(unit_batch(read_units(cfg.source)), cfg.model_dump_json())
    redone = [r for table in rows for r in shard_results(processor(table))]
    assert redone == records and "field stats is missing" in caplog.text  # the damaged shard was made again


def test_a_shard_record_from_before_units_and_read_spans_loads(tmp_path) -> None:
    layout = make_preprocess(str(tmp_path / "run"), documents=20, shards=1)
    folder = layout.path("preprocess", ".shards")
    [path] = [os.path.join(folder, name) for name in os.listdir(folder)]
    _drop(path, "unit")
    _drop(path, "read_span")
    old = read_record(ShardRecord, path, "preprocess")
    assert old.unit is None and old.read_span == (0.0, 0.0)
