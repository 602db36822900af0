"""A run directory on an object store, end to end through `pofa run` and a real S3-compatible server
(moto, IAM enforced): refused writes fail before any cluster work; a run killed mid-student resumes
on "another node" (an empty local mirror) from the checkpoint in the store; the exported model,
manifests and MLflow store are in the bucket."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.s3_server import BUCKET, S3Server, s3_server
from tests.workers.train_fixture import read_weights
from workers.run_records import TrainSummary, read_record
from workers.storage import RunStore

pytestmark = pytest.mark.integration  # Ray, DeepSpeed, a server or a subprocess pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PREFIX = "runs/tiny-on-s3"
SHORT = ["preprocess.source.max_documents=30", "ray.num_cpus=2",
         "teacher.max_steps=4", "teacher.eval_every=4", "teacher.checkpoint_every=4",
         "student.max_steps=12", "student.eval_every=12", "student.checkpoint_every=4", "student.keep_checkpoints=2",
         "student.pruning.schedule.policy_end_step=6", "student.pruning.schedule.end_pruning_step=8",
         "student.pruning.schedule.pruning_frequency=2"]
COMMITTED = f"{PREFIX}/student/checkpoints/step-00000004/MANIFEST.json"


def _cmd(uri: str) -> list[str]:
    cmd = [sys.executable, "-m", "orchestrator.cli", "run", "tiny", "--run-dir", uri, "--stages",
           "preprocess,teacher,student"]
    for s in SHORT:
        cmd += ["--set", s]
    return cmd


def _env(s3: S3Server, key: dict[str, str], mirror: str) -> dict[str, str]:
    # a short lease: node B waits out the one node A's killed driver left (60 s by default)
    return {**os.environ, **s3.env(key), "POFA_MIRROR_DIR": mirror, "RAY_ADDRESS": "", "PYTHONPATH": ROOT,
            "POFA_LEASE_S": "8"}


def _client(s3: S3Server):
    import boto3

    return boto3.client("s3", endpoint_url=s3.endpoint, region_name="us-east-1",
                        aws_access_key_id=s3.read_write["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=s3.read_write["AWS_SECRET_ACCESS_KEY"])


def _keys(client, prefix: str = PREFIX) -> list[str]:
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("object-store")
    with s3_server(str(tmp / "moto.log")) as s3:
        uri = s3.uri(PREFIX)
        client = _client(s3)
        out: dict = {"s3": s3, "uri": uri, "tmp": tmp}
        # 1. read-only credentials: refused before Ray starts, nothing written
        started = time.time()
        refused = subprocess.run(_cmd(uri), env=_env(s3, s3.read_only, str(tmp / "node-a")), cwd=ROOT,
                                 capture_output=True, text=True, timeout=300)
        out["refused"] = (refused, time.time() - started, _keys(client))
        # 2. node A: killed (no clean-up) once the student has committed its step-4 checkpoint
        log_a = open(tmp / "node-a.log", "w")
        driver = subprocess.Popen(_cmd(uri), env=_env(s3, s3.read_write, str(tmp / "node-a")), cwd=ROOT,
                                  stdout=log_a, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.time() + 600
            while driver.poll() is None and time.time() < deadline and COMMITTED not in _keys(client, COMMITTED):
                time.sleep(1)
        finally:
            os.killpg(driver.pid, signal.SIGKILL)  # the node is gone: driver, Ray and workers
            driver.wait()
            log_a.close()
        time.sleep(2)  # a commit already on the wire when the node died still lands: count it
        out["killed_at"] = sorted(k for k in _keys(client, f"{PREFIX}/student/checkpoints/") if k.endswith("MANIFEST.json"))
        assert out["killed_at"], (tmp / "node-a.log").read_text()[-4000:]
        # 3. node B: an empty mirror; the same command resumes from the store
        resumed = subprocess.run(_cmd(uri), env=_env(s3, s3.read_write, str(tmp / "node-b")), cwd=ROOT,
                                 capture_output=True, text=True, timeout=600)
        assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-4000:]
        out["resumed"] = resumed
        out["keys"] = _keys(client)
        # what a third machine sees: everything comes from the bucket
        os.environ.update(s3.env(s3.read_write))
        try:
            reader = RunStore.open(uri, mirror_root=str(tmp / "reader"))
            reader.pull()
            out["reader"] = reader
        finally:
            for name in s3.env(s3.read_write):
                os.environ.pop(name, None)
        yield out


def test_a_store_that_refuses_writes_fails_before_any_cluster_work(runs) -> None:
    res, elapsed, keys = runs["refused"]
    assert res.returncode == 2 and elapsed < 60
    assert runs["s3"].uri(PREFIX) in res.stderr and "refused" in res.stderr
    assert "Ray at" not in res.stdout and keys == []
    assert runs["s3"].read_only["AWS_SECRET_ACCESS_KEY"] not in res.stdout + res.stderr


def test_rerun_on_another_node_skips_finished_stages_and_resumes_the_student(runs) -> None:
    out = runs["resumed"].stdout
    assert "[preprocess] up to date" in out and "[teacher] up to date" in out
    reader: RunStore = runs["reader"]
    with open(reader.local_path("student/manifest.json")) as f:
        stats = json.load(f)["stats"]
    newest = int(runs["killed_at"][-1].split("step-")[1][:8])
    assert stats["final_step"] == 12 and stats["start_steps"] == [0, newest] and 4 <= newest < 12
    summary = read_record(TrainSummary, reader.local_path("student/train_summary.json"), "student")
    assert summary.checkpoint is not None and summary.checkpoint.startswith(f"s3://{BUCKET}/{PREFIX}/student/checkpoints/step-00000012")


def test_checkpoints_are_committed_and_pruned_in_the_store(runs) -> None:
    committed = sorted(k for k in runs["keys"] if k.startswith(f"{PREFIX}/student/checkpoints/")
                       and k.endswith("MANIFEST.json"))
    assert [k.split("/")[-2] for k in committed] == ["step-00000008", "step-00000012"]
    names = [k.split("/")[-1] for k in runs["keys"]]
    assert not any(n == ".lock" or n.endswith((".tmp", ".part")) or n.startswith(".pofa-write-check") for n in names)
    assert not any("/.tmp-" in k for k in runs["keys"])  # staging folders stay on the nodes
    # Ray Train's own run state is in the store too, so its controller can restore on any node
    assert any(k.startswith(f"{PREFIX}/student/ray/pofa-student/") for k in runs["keys"])


def test_the_exported_sparse_model_is_in_the_bucket(runs) -> None:
    from transformers import AutoConfig

    reader: RunStore = runs["reader"]
    model_dir = reader.local_path("student/model")
    assert AutoConfig.from_pretrained(model_dir).model_type == "bert"
    weights = read_weights(model_dir)
    encoder = [w for n, w in weights.items() if ".encoder." in n and n.endswith("weight") and w.dim() == 2]
    assert encoder and all(abs(float((w == 0).float().mean()) - 0.9) < 2e-3 for w in encoder)


def test_mlflow_store_in_the_bucket_records_the_restart(runs) -> None:
    from mlflow import MlflowClient

    reader: RunStore = runs["reader"]
    from orchestrator.tracking.session import LOCAL_STORE_KEY

    with open(reader.local_path("tracking.json")) as f:
        entry = json.load(f)["stores"][LOCAL_STORE_KEY]
    client = MlflowClient(f"sqlite:///{reader.local_path('mlflow.db')}")
    student = client.get_run(entry["stages"]["student"]["run_id"])
    assert student.info.artifact_uri.startswith(f"s3://{BUCKET}/{PREFIX}/mlartifacts/")
    assert any(k.startswith(f"{PREFIX}/mlartifacts/") for k in runs["keys"])
    assert student.data.tags["student.attempts"] == "2"
    assert student.data.metrics["sparsity/global"] == pytest.approx(0.9, abs=1e-3)
