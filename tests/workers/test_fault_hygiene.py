"""Faults that must never block a resume: a torn JSON Lines file, a damaged data shard, a checkpoint
read that fails once."""
from __future__ import annotations

import json
import os

from pipelines.data.config import PreprocessConfig
from pipelines.data.sources import read_units
from tests.workers.test_train_checkpoint import Trainer
from tests.workers.train_fixture import make_preprocess
from workers.jsonl import read_jsonl
from workers.preprocess.tasks import ShardProcessor, read_shards, shard_results, unit_batch
from workers.run_layout import RunLayout
from workers.stage_outputs import PreprocessOutput, read_output
from workers.storage import RunStore


def test_a_torn_last_line_is_dropped_and_the_file_repaired(tmp_path, caplog) -> None:
    path = str(tmp_path / "metrics.jsonl")
    with open(path, "w") as f:
        f.write(json.dumps({"step": 1}) + "\n" + json.dumps({"step": 2}) + "\n" + '{"step": 3, "lo')
    assert [r["step"] for r in read_jsonl(path)] == [1, 2]
    assert "torn last line" in caplog.text
    with open(path, "a") as f:  # the next append starts on a clean line
        f.write(json.dumps({"step": 3}) + "\n")
    assert [r["step"] for r in read_jsonl(path)] == [1, 2, 3]


def test_a_damaged_shard_is_made_again_not_trusted_from_its_record(tmp_path) -> None:
    layout = make_preprocess(str(tmp_path), documents=30)
    record = read_output(layout, "preprocess", PreprocessOutput)
    shard = record.splits["train"].shards[0]
    path = layout.shard("train", shard.name)
    with open(path, "r+b") as f:  # same size, other bytes: a bad copy
        f.seek(100)
        f.write(b"\xff" * 16)
    manifest = json.load(open(layout.manifest("preprocess")))
    cfg = PreprocessConfig.model_validate(manifest["config"])
    units = read_units(cfg.source)
    processor = ShardProcessor(cfg.model_dump_json(), 0, layout)
    rows = next(read_shards(unit_batch(units), cfg.model_dump_json()))
    again = shard_results(processor(rows))[0]
    assert again.shards["train"].sha256 == shard.sha256  # made again, byte for byte


def test_a_checkpoint_read_that_fails_once_is_retried_not_set_aside(tmp_path, monkeypatch) -> None:
    layout = RunLayout.open(str(tmp_path))
    first = Trainer(layout)
    first.train_step()
    first.checkpointer.save(first.step)
    calls = {"n": 0}
    real_fetch = RunStore.fetch

    def flaky(self, rel, names, dest):  # a network blip on the first read
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError("connection reset by peer")
        return real_fetch(self, rel, names, dest)

    monkeypatch.setattr(RunStore, "fetch", flaky)
    monkeypatch.setattr("workers.train.checkpointer.READ_RETRY_S", 0.01)
    warnings: list[str] = []
    second = Trainer(layout, warn=warnings.append)
    assert second.checkpointer.restore()[0] == 1 and calls["n"] == 2
    assert len(warnings) == 1 and "reading it again" in warnings[0]
    assert os.listdir(layout.training("student").checkpoints) == ["step-00000001"]
