"""`python -m tests.integration.multinode_driver RUN_DIR`: a real multi-node Ray cluster on this
machine (a head with no CPUs plus two 1-CPU worker nodes, each its own raylet; the second joins only
after the stage started waiting for it), the tiny student stage with one worker per node, and a node
lost mid-stage and replaced. Writes RUN_DIR/report.json.

This process owns the cluster (Ray's node control needs the main thread); the stage runs in a
separate driver process that joins the cluster through RAY_ADDRESS, as `pofa run` on a head would.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

LOSE_AFTER = "step-00000004"  # the node goes when this checkpoint exists
KILL_DRIVER_AFTER = "step-00000012"  # then the driver, when this one is committed


def train(run_dir: str) -> None:
    """The driver: the student stage tracked in MLflow (SQLite in the run directory)."""
    import ray

    from orchestrator.tracking.config import TrackingConfig
    from orchestrator.tracking.session import TrackingSession
    from tests.workers.train_fixture import student_spec
    from workers.train.driver import run_training

    ray.init(log_to_driver=False)
    session = TrackingSession.open(TrackingConfig(uri=f"sqlite:///{run_dir}/mlflow.db", experiment="multinode"),
                                   run_dir, recipe={"test": "multinode"}, run_name="multinode")
    session.start_stage("student")
    spec = student_spec(run_dir, num_workers=2, cpus_per_worker=1, placement_strategy="SPREAD", max_steps=24,
                        checkpoint_every=2, keep_checkpoints=2, max_failures=2)
    spec.tracker = session.worker_tracker("student")  # rank 0 on another node: records go through this driver
    spec.resource_wait_s = 300  # the second worker node joins after the stage has started
    started_at = time.time()
    marker = os.path.join(run_dir, "stage-started")
    if os.path.exists(marker):  # a resubmission: the stage started with the first driver
        with open(marker) as f:
            started_at = float(f.read())
    else:
        with open(marker, "w") as f:
            f.write(str(started_at))
    result = run_training(spec, echo=False)
    session.end_stage("student")
    session.finish()
    with open(os.path.join(run_dir, "result.json"), "w") as f:
        json.dump({"stage_started_at": started_at, "final_step": result.final_step,
                   "start_steps": result.start_steps, "model_dir": result.model_dir,
                   "student_run_id": session.stage_run_id("student")}, f)


def main(run_dir: str) -> None:
    from ray.cluster_utils import Cluster

    from tests.workers.train_fixture import make_preprocess, make_teacher_export

    make_preprocess(run_dir, documents=280)
    make_teacher_export(run_dir)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})  # the head runs no train worker
    workers = [cluster.add_node(num_cpus=1)]
    cluster.wait_for_nodes()
    env = {**os.environ, "RAY_ADDRESS": cluster.address}
    driver = subprocess.Popen([sys.executable, "-m", "tests.integration.multinode_driver", "train", run_dir], env=env)
    try:
        started = os.path.join(run_dir, "stage-started")
        while not os.path.exists(started) and driver.poll() is None:
            time.sleep(0.05)
        time.sleep(3)  # the stage is waiting for a second node (ray.resource_wait_s)
        events: dict = {"late_join_at": time.time()}
        workers.append(cluster.add_node(num_cpus=1))
        events["workers"] = [w.node_id for w in workers]
        checkpoint = os.path.join(run_dir, "student", "checkpoints", LOSE_AFTER, "MANIFEST.json")  # committed
        deadline = time.time() + 600
        while not os.path.exists(checkpoint) and driver.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        if not os.path.exists(checkpoint):
            raise RuntimeError(f"the stage never wrote {LOSE_AFTER} (driver exit code {driver.poll()})")
        cluster.remove_node(workers[0], allow_graceful=False)  # as a crashed VM: no goodbye
        events["removed"] = workers[0].node_id
        time.sleep(2)
        events["added"] = cluster.add_node(num_cpus=1).node_id
        # then the driver itself is lost mid-stage (the head pod of a RayJob): its workers go with it,
        # and the next submission, the same command, resumes from the newest checkpoint
        later = os.path.join(run_dir, "student", "checkpoints", KILL_DRIVER_AFTER, "MANIFEST.json")
        deadline = time.time() + 600
        while not os.path.exists(later) and driver.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        if not os.path.exists(later):
            raise RuntimeError(f"the stage never committed {KILL_DRIVER_AFTER} (driver exit code {driver.poll()})")
        driver.kill()
        driver.wait()
        events["driver_killed_at"] = time.time()
        driver = subprocess.Popen([sys.executable, "-m", "tests.integration.multinode_driver", "train", run_dir],
                                  env=env)
        if driver.wait(timeout=600) != 0:
            raise RuntimeError(f"the resubmitted training driver failed with exit code {driver.returncode}")
    finally:
        if driver.poll() is None:
            driver.kill()
        cluster.shutdown()
    with open(os.path.join(run_dir, "result.json")) as f:
        report = json.load(f)
    with open(os.path.join(run_dir, "student", "attempts.jsonl")) as f:
        report["attempts"] = [json.loads(line) for line in f]
    report.update(events=events, mlflow_uri=f"sqlite:///{run_dir}/mlflow.db")
    with open(os.path.join(run_dir, "report.json"), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    if sys.argv[1] == "train":
        train(sys.argv[2])
    else:
        main(sys.argv[1])
