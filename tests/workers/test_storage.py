"""Run directories on an object store, against a real S3-compatible server (moto, IAM enforced):
mirror sync, refused writes, and checkpoints committed by their manifest."""
from __future__ import annotations

import json
import os

import pytest
import torch

from tests.s3_server import S3Server
from workers.storage import RunStore, StorageError, mirror_for
from workers.train import checkpoint as ckpt
from workers.train import stored_checkpoint as stored


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


def _stage_rank(folder: str, rank: int) -> dict[str, int]:
    os.makedirs(os.path.join(folder, ckpt.DS_TAG))
    torch.save({"w": torch.full((64,), float(rank))},
               os.path.join(folder, ckpt.DS_TAG, f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"))
    _write(os.path.join(folder, f"rank-{rank}.json"), json.dumps({"rank": rank}).encode())
    if rank == 0:
        torch.save({"model": torch.ones(8)}, os.path.join(folder, ckpt.DS_TAG, "mp_rank_00_model_states.pt"))
        _write(os.path.join(folder, "latest"), ckpt.DS_TAG.encode())
        _write(os.path.join(folder, ckpt.TRAINER_STATE), b'{"step": 1}')
    return stored.staged_files(folder)


def _save(store: RunStore, step: int, world: int = 2) -> str:
    rel = f"student/checkpoints/{ckpt.step_dir_name(step)}"
    reported = []
    for rank in range(world):
        staging = store.local_path(f"student/checkpoints/.tmp-{step}.rank-{rank}")
        files = _stage_rank(staging, rank)
        stored.upload(store, staging, rel, files)
        reported.append(files)
    assert stored.commit(store, rel, step, world, reported) is None
    return rel


def test_checkpoints_commit_last_fetch_one_rank_share_and_set_aside_corruption(store, tmp_path) -> None:
    root = "student/checkpoints"
    # a step whose ranks did not all upload is never committed
    staging = store.local_path("student/checkpoints/.tmp-1.rank-0")
    files = _stage_rank(staging, 0)
    stored.upload(store, staging, f"{root}/{ckpt.step_dir_name(1)}", files)
    assert "rank-1.json" in stored.commit(store, f"{root}/{ckpt.step_dir_name(1)}", 1, 2, [files])
    assert stored.committed(store, root) == []

    for step in (2, 4, 6):
        _save(store, step)
    stored.prune(store, root, keep=2)
    assert [s for s, _ in stored.committed(store, root)] == [6, 4]
    assert not any(n.startswith("step-00000002/") for n in store.listing(root))

    newest = stored.committed(store, root)[0][1]
    assert stored.verify_stored(store, newest) is None
    dest = str(tmp_path / "restore-rank-1")
    assert stored.fetch(store, newest, 1, dest) is None
    got = {os.path.relpath(os.path.join(b, n), dest) for b, _, ns in os.walk(dest) for n in ns}
    assert "rank-1.json" in got and "rank-0.json" not in got
    assert f"{ckpt.DS_TAG}/mp_rank_00_model_states.pt" in got
    assert not any("zero_pp_rank_0_" in g for g in got)

    # same size, broken bytes: only reading it back finds it; the checkpoint is then un-committed
    shard = f"{newest}/{ckpt.DS_TAG}/zero_pp_rank_1_mp_rank_00_optim_states.pt"
    size = store.listing(newest)[f"{ckpt.DS_TAG}/zero_pp_rank_1_mp_rank_00_optim_states.pt"][0]
    _write(str(tmp_path / "broken.pt"), b"\0" * size)
    store.upload(shard, str(tmp_path / "broken.pt"))
    assert stored.verify_stored(store, newest) is None
    problem = stored.fetch(store, newest, 1, dest)
    assert problem and "zero_pp_rank_1" in problem
    warnings: list[str] = []
    stored.set_aside(store, newest, problem, warnings.append)
    assert [s for s, _ in stored.committed(store, root)] == [4] and warnings
    assert "CORRUPT.json" in {os.path.basename(n) for n in store.listing(newest)}


def test_a_checkpoint_the_store_refuses_is_never_committed(s3, store, monkeypatch) -> None:
    """Writes revoked mid-run: the upload fails naming the store, and the last committed step stays
    the newest, so the rerun with fixed credentials resumes from it."""
    root = "student/checkpoints"
    _save(store, 2)
    for name, value in s3.env(s3.read_only).items():
        monkeypatch.setenv(name, value)
    staging = store.local_path("student/checkpoints/.tmp-4.rank-0")
    files = _stage_rank(staging, 0)
    with pytest.raises(StorageError, match="refused") as err:
        stored.upload(store, staging, f"{root}/{ckpt.step_dir_name(4)}", files)
    assert f"{store.display}/{root}/step-00000004/" in str(err.value)
    assert [s for s, _ in stored.committed(store, root)] == [2]


def test_resuming_with_another_worker_count_is_refused_before_training(store) -> None:
    from types import SimpleNamespace

    from workers.train.preflight import check_checkpoint_world

    _save(store, 2, world=2)
    spec = SimpleNamespace(store=store, checkpoint_dir=store.local_path("student/checkpoints"),
                           train=SimpleNamespace(num_workers=1))
    with pytest.raises(ValueError, match="written by 2 workers.*num_workers=2"):
        check_checkpoint_world(spec)
    spec.train.num_workers = 2
    check_checkpoint_world(spec)
