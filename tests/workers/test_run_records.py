"""Run files through their declared models (workers/run_records.py): each model reads back what the
real producer writes, byte for byte; a missing or invalid field is one error naming the file, the
field and the stage to redo."""
from __future__ import annotations

import json
import os

import pytest

from tests.workers.test_train_checkpoint import Trainer, _saved
from workers.run_layout import RunLayout
from workers.run_records import CheckpointManifest, write_record
from workers.train.checkpointer import MANIFEST, CheckpointError, read_manifest


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
