"""Run directories on an object store, against a real S3-compatible server (moto, IAM enforced):
mirror sync, refused writes, and the checkpointer committing, fetching and setting aside there."""
from __future__ import annotations

import json
import time
import os

import pytest
import torch

from tests.s3_server import S3Server
from tests.workers.test_train_checkpoint import Trainer
from workers.run_layout import RunLayout
from workers.storage import RunStore, StorageError, mirror_for
from workers.train.checkpoint_parts import DS_TAG
from workers.run_records import CheckpointManifest, dump_record
from workers.train.checkpointer import CORRUPT, FORMAT, MANIFEST, CheckpointError, file_owner

pytestmark = pytest.mark.integration  # Ray, DeepSpeed, a server or a subprocess pipeline


@pytest.fixture
def store(s3: S3Server, tmp_path, monkeypatch, request) -> RunStore:
    for name, value in s3.env(s3.read_write).items():
        monkeypatch.setenv(name, value)
    return RunStore.open(s3.uri(f"runs/{request.node.name}"), mirror_root=str(tmp_path / "mirror"))


def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def test_mirror_path_is_the_same_on_every_node_and_refuses_escapes(tmp_path) -> None:
    assert mirror_for("s3://bucket/a/b?endpoint_override=x", str(tmp_path)) == str(tmp_path / "s3" / "bucket" / "a" / "b")
    with pytest.raises(StorageError, match="plain prefix"):
        mirror_for("s3://bucket/a/../../etc", str(tmp_path))
    local = RunStore.open(str(tmp_path / "run"))
    assert not local.remote and local.local == local.uri and local.push() == 0 and local.pull() == 0


def test_push_and_pull_move_only_what_changed(store: RunStore) -> None:
    _write(store.local_path("stage/data/a.bin"), b"a" * 1000)
    _write(store.local_path("stage/manifest.json"), b"{}")
    _write(store.local_path(".lock"), b"pid")
    _write(store.local_path("stage/ray/state"), b"ray")
    assert store.push() == 2
    assert set(store.listing()) == {"stage/data/a.bin", "stage/manifest.json"}  # lock and Ray state stay local
    assert store.push() == 0
    _write(store.local_path("stage/data/a.bin"), b"b" * 999)
    assert store.push() == 1 and store.listing("stage/data")["a.bin"][0] == 999

    fresh = RunStore(store.uri, store.local + "-other-node")  # another node: an empty mirror
    assert fresh.pull("stage/manifest.json") == 1 and os.listdir(fresh.local_path("stage")) == ["manifest.json"]
    assert fresh.pull() == 1  # the manifest is already there
    with open(fresh.local_path("stage/data/a.bin"), "rb") as f:
        assert f.read() == b"b" * 999
    assert fresh.pull() == 0
    # this node's change not stored yet is kept; a file the store no longer has goes with prune
    _write(fresh.local_path("stage/manifest.json"), b'{"local": "newer"}')
    _write(fresh.local_path("stage/data/stale.bin"), b"from a redone attempt")
    assert fresh.pull() == 0 and os.path.exists(fresh.local_path("stage/data/stale.bin"))
    assert fresh.pull("stage/data", prune=True) == 0
    assert os.listdir(fresh.local_path("stage/data")) == ["a.bin"]
    with open(fresh.local_path("stage/manifest.json"), "rb") as f:
        assert f.read() == b'{"local": "newer"}'


def test_a_store_that_refuses_writes_fails_clearly_and_keeps_nothing(s3, store, monkeypatch) -> None:
    for name, value in s3.env(s3.read_only).items():
        monkeypatch.setenv(name, value)
    with pytest.raises(StorageError) as err:
        store.check_writable()
    text = str(err.value)
    assert store.display in text and "refused" in text and s3.read_only["AWS_SECRET_ACCESS_KEY"] not in text
    for name, value in s3.env(s3.read_write).items():
        monkeypatch.setenv(name, value)
    assert store.listing() == {}
    store.check_writable()  # fixed credentials: the same store works, the probe leaves nothing
    assert store.listing() == {}


def _layout(store: RunStore, node: str) -> RunLayout:
    """The same stored run seen from a node with its own (possibly empty) mirror."""
    return RunLayout(RunStore(store.uri, os.path.realpath(store.local + "-" + node)))


def test_checkpoints_commit_last_fetch_from_another_node_and_set_aside_corruption(store) -> None:
    layout = _layout(store, "a")
    trainer = Trainer(layout, keep=2)
    for step in (2, 4, 6):
        while trainer.step < step:
            trainer.train_step()
        trainer.checkpointer.save(step)
    root = "student/checkpoints"
    assert [s for s, _ in trainer.checkpointer.committed()] == [6, 4]
    assert not any(n.startswith("step-00000002/") for n in store.listing(root))
    assert not os.path.exists(layout.training("student").checkpoint_step(6))  # staged, uploaded, gone locally
    # another node, an empty mirror: restores from the store
    warnings: list[str] = []
    other = Trainer(_layout(store, "b"), warn=warnings.append)
    assert other.checkpointer.restore()[0] == 6 and other.step == 6 and not warnings
    # same size, broken bytes in the store: only the sha256 check finds it; un-committed, not deleted
    shard = f"{root}/step-00000006/{DS_TAG}/zero_pp_rank_0_mp_rank_00_optim_states.pt"
    size = store.listing(root)[shard[len(root) + 1:]][0]
    _write(store.local + "-broken.pt", b"\0" * size)
    store.upload(shard, store.local + "-broken.pt")
    third = Trainer(_layout(store, "c"), warn=warnings.append)
    assert third.checkpointer.restore()[0] == 4
    assert "sha256" in warnings[0]
    assert not store.listing(f"{root}/step-00000006")  # moved aside in the store, files and all
    aside = {n.split("/")[0] for n in store.listing(root) if n.startswith("corrupt-step-00000006-")}
    assert len(aside) == 1
    names = store.listing(f"{root}/{aside.pop()}")
    assert CORRUPT in names and MANIFEST not in names and f"{DS_TAG}/zero_pp_rank_0_mp_rank_00_optim_states.pt" in names


def test_a_rank_fetches_the_shared_files_and_only_its_own() -> None:
    files = ["train_state.json", "pruning.safetensors", "rank-0.data.json", "rank-1.rng.safetensors",
             f"{DS_TAG}/mp_rank_00_model_states.pt", f"{DS_TAG}/zero_pp_rank_0_mp_rank_00_optim_states.pt",
             f"{DS_TAG}/zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    mine = [f for f in files if file_owner(f) in (None, 1)]
    assert mine == ["train_state.json", "pruning.safetensors", "rank-1.rng.safetensors",
                    f"{DS_TAG}/mp_rank_00_model_states.pt", f"{DS_TAG}/zero_pp_rank_1_mp_rank_00_optim_states.pt"]


def test_a_checkpoint_the_store_refuses_is_never_committed(s3, store, monkeypatch) -> None:
    """Writes revoked mid-run: the save fails naming the store, and the last committed step stays
    the newest, so the rerun with fixed credentials resumes from it."""
    layout = _layout(store, "a")
    trainer = Trainer(layout)
    trainer.train_step()
    trainer.checkpointer.save(1)
    for name, value in s3.env(s3.read_only).items():
        monkeypatch.setenv(name, value)
    trainer.train_step()
    with pytest.raises(CheckpointError, match="refused") as err:
        trainer.checkpointer.save(2)
    assert f"{store.display}/student/checkpoints/step-00000002" in str(err.value)
    assert [s for s, _ in trainer.checkpointer.committed()] == [1]


def test_resuming_with_another_worker_count_is_refused_before_training(store) -> None:
    from types import SimpleNamespace

    from workers.train.preflight import check_checkpoint_world

    layout = _layout(store, "a")
    manifest = CheckpointManifest(format=FORMAT, step=2, world_size=2, created=0.0, parts=[], rank_parts=[], zero_stage=2,
                                  files={})
    layout.store.write_json(f"student/checkpoints/step-00000002/{MANIFEST}", dump_record(manifest))
    spec = SimpleNamespace(layout=layout, run=layout.training("student"), elastic=False,
                           train=SimpleNamespace(num_workers=1, zero_stage=2))
    with pytest.raises(ValueError, match="written by 2 workers.*num_workers=2"):
        check_checkpoint_world(spec)
    spec.train.num_workers = 2
    check_checkpoint_world(spec)


def test_a_run_dir_uri_with_credentials_is_refused_and_mirrors_are_private(tmp_path) -> None:
    for uri in ("s3://AKIAKEY:secret@bucket/runs/x", "s3://bucket/runs/x?access_key=AKIA&secret_key=s"):
        with pytest.raises(StorageError, match="carries credentials") as err:
            RunStore.open(uri, mirror_root=str(tmp_path / "m"))
        assert "secret" not in str(err.value).replace("secret_key", "")
    store = RunStore.open("s3://bucket/runs/x", mirror_root=str(tmp_path / "m"))
    assert os.stat(tmp_path / "m").st_mode & 0o777 == 0o700 and store.local.startswith(str(tmp_path / "m"))
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    os.chmod(shared, 0o777)  # others could swap the mirror's files
    with pytest.raises(StorageError, match="writable by others"):
        RunStore.open("s3://bucket/runs/x", mirror_root=str(shared))


def test_the_stored_tracking_store_wins_over_a_newer_stray_copy(store: RunStore) -> None:
    """A node's own mlflow.db (left by a process that could not reach the real one) is newer than the
    stored copy: a driver starting there takes the stored one, never pushes the stray one over it."""
    _write(store.local_path("mlflow.db"), b"the run's records")
    _write(store.local_path("teacher/notes.txt"), b"stored")
    store.push()
    other = RunStore(store.uri, store.local + "-node-b")
    _write(other.local_path("mlflow.db"), b"an empty stray database")
    _write(other.local_path("teacher/notes.txt"), b"this node's newer change")
    future = time.time() + 60
    for rel in ("mlflow.db", "teacher/notes.txt"):
        os.utime(other.local_path(rel), (future, future))
    other.pull(prune=True)
    assert open(other.local_path("mlflow.db"), "rb").read() == b"the run's records"
    assert open(other.local_path("teacher/notes.txt"), "rb").read() == b"this node's newer change"
