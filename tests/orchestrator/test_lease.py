"""The lease that keeps two machines out of one object-store run directory, against a real
S3-compatible server: a live holder is refused, one left by a killed process is taken over."""
from __future__ import annotations

import time

import pytest

from orchestrator.lease import LEASE, Lease, LeaseHeld
from orchestrator.rundir import RunDir, RunDirError
from tests.s3_server import S3Server
from workers.storage import RunStore

pytestmark = pytest.mark.integration  # Ray, DeepSpeed, a server or a subprocess pipeline


@pytest.fixture
def store(s3: S3Server, tmp_path, monkeypatch, request) -> RunStore:
    for name, value in s3.env(s3.read_write).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("POFA_LEASE_S", "3")
    monkeypatch.setenv("POFA_MIRROR_DIR", str(tmp_path / "mirror"))
    return RunStore.open(s3.uri(f"leases/{request.node.name}"), mirror_root=str(tmp_path / "mirror"))


def test_a_live_holder_is_refused_and_named(store: RunStore) -> None:
    holder = Lease(store, console=lambda _: None)
    holder.acquire()
    try:
        started = time.monotonic()
        with pytest.raises(LeaseHeld, match=f"in use by pid .*{holder.owner.split(' on ')[1]}"):
            Lease(store, console=lambda _: None).acquire()
        assert time.monotonic() - started < 6  # it saw the heartbeat move: no need to wait out the lease
    finally:
        holder.release()
    assert not store.exists(LEASE)  # released: the next process starts at once


def test_a_lease_left_by_a_killed_process_expires_and_is_taken_over(store: RunStore) -> None:
    dead = Lease(store, console=lambda _: None)
    dead.acquire()
    dead._stop.set()  # the process is gone: no more heartbeats, and no release
    said: list[str] = []
    started = time.monotonic()
    successor = Lease(store, console=said.append)
    successor.acquire()
    try:
        assert 2 <= time.monotonic() - started < 10 and "waiting up to 3 s" in said[0]
        assert successor._read()["token"] == successor.token
    finally:
        successor.release()


def test_run_dir_on_a_store_takes_and_gives_back_the_lease(store: RunStore, s3: S3Server, monkeypatch) -> None:
    rd = RunDir(store.uri)
    rd.acquire(console=lambda _: None)
    try:
        assert store.exists(LEASE)
        with pytest.raises(RunDirError, match="in use by"):
            RunDir(store.uri).acquire(console=lambda _: None)  # same mirror: the file lock refuses first
    finally:
        rd.release()
    assert not store.exists(LEASE)
    for name, value in s3.env(s3.read_only).items():
        monkeypatch.setenv(name, value)
    with pytest.raises(RunDirError, match="refused"):
        RunDir(store.uri).acquire(console=lambda _: None)


def test_a_holder_that_lost_its_lease_commits_nothing(store: RunStore) -> None:
    """The holder stalled past the expiry and another machine took the run over: the old holder
    never writes over the new lease, and no commit of its own (stage or checkpoint) goes through."""
    import dataclasses

    from tests.workers.test_train_checkpoint import Trainer
    from workers.run_layout import RunLayout
    from workers.train.checkpointer import CheckpointError

    warnings: list[str] = []
    lease = Lease(store, console=warnings.append)
    lease.acquire()
    holder = dataclasses.replace(store, lease_token=lease.token)
    try:
        assert holder.lease_problem() is None
        store.write_json(LEASE, {"owner": "pid 7 on node-b", "token": "theirs", "heartbeat": time.time(),
                                 "ttl_s": 3})
        deadline = time.monotonic() + 10
        while lease.lost is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert lease.lost == "taken over by pid 7 on node-b" and "taken over" in warnings[-1]
        assert "pid 7 on node-b" in holder.lease_problem()
        trainer = Trainer(RunLayout(holder))
        trainer.train_step()
        with pytest.raises(CheckpointError, match="taken over by pid 7 on node-b"):
            trainer.checkpointer.save(1)
        assert trainer.checkpointer.committed() == []
    finally:
        lease.release()
    assert store.read_json(LEASE)["token"] == "theirs"  # never written over, nor removed on release
