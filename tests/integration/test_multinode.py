"""Multi-node: a head and two worker nodes (separate raylets, the second joining while the stage
waits for it), one student worker per node, one node lost mid-stage, then the driver itself killed
and resubmitted. The stage resumes from its last checkpoint on the remaining and a re-added node,
again after the driver's loss, and ends at the target sparsity; MLflow records every restart; the
rank-0 worker's records reach the driver's store through the relay."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.workers.train_fixture import read_weights

pytestmark = pytest.mark.integration  # Ray, DeepSpeed, a server or a subprocess pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    run_dir = tmp_path_factory.mktemp("multinode")
    env = {**os.environ, "PYTHONPATH": ROOT, "RAY_ADDRESS": ""}
    res = subprocess.run([sys.executable, "-m", "tests.integration.multinode_driver", str(run_dir)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    with open(run_dir / "report.json") as f:
        return json.load(f)


def test_one_worker_per_node_then_resume_after_node_loss(report) -> None:
    first, *later = report["attempts"]
    events = report["events"]
    assert sorted(first["nodes"]) == sorted(events["workers"])  # SPREAD: one rank on each worker node
    # the second node joined after the stage had started: it waited for it (ray.resource_wait_s)
    assert report["stage_started_at"] < events["late_join_at"] < first["time"]
    assert later, "the lost node did not cause a restart"
    last = later[-1]
    assert events["removed"] not in last["nodes"] and events["added"] in last["nodes"]
    assert last["start_step"] >= 4 and last["checkpoint"].endswith(f"step-{last['start_step']:08d}")
    assert report["final_step"] == 24 and report["start_steps"][0] == 0


def test_a_killed_driver_resumes_on_the_next_submission(report) -> None:
    last = report["attempts"][-1]
    assert last["time"] > report["events"]["driver_killed_at"]  # the resubmitted driver's attempt
    assert last["start_step"] >= 12 and last["checkpoint"].endswith(f"step-{last['start_step']:08d}")
    assert len(report["attempts"]) >= 3  # first, after the node loss, after the driver loss


def test_resumed_stage_reaches_the_target_sparsity(report) -> None:
    weights = read_weights(report["model_dir"])
    encoder = [w for n, w in weights.items() if ".encoder." in n and n.endswith("weight") and w.dim() == 2]
    assert encoder and all(abs(float((w == 0).float().mean()) - 0.9) < 2e-3 for w in encoder)


def test_mlflow_records_the_restart(report) -> None:
    from mlflow import MlflowClient

    run = MlflowClient(report["mlflow_uri"]).get_run(report["student_run_id"])
    assert int(run.data.tags["student.attempts"]) == len(report["attempts"]) >= 2
    assert run.data.tags["student.start_step"] == str(report["attempts"][-1]["start_step"])
    assert run.data.metrics["sparsity/global"] == pytest.approx(0.9, abs=1e-3)
