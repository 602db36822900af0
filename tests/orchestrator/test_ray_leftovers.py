"""A SIGKILLed `pofa run` driver leaves its local Ray instance's processes behind; the next run finds
exactly those (by the token they inherited), reports them and stops them, and touches nothing else."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from orchestrator.ray_leftovers import ENV, instance_processes, stop_leftovers

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]

DRIVER = """
import sys, time
sys.path.insert(0, {repo!r})
import ray
from orchestrator.ray_runtime import connect
from orchestrator.recipe.schema import RayConfig

connect(RayConfig(num_cpus=1), log_to_driver=False, instance_record={record!r})

@ray.remote
class Holder:
    def start_helper(self):
        # a daemon a worker starts (a compiler server, a profiler, a data-loading service): detached
        # from the worker, so Ray's clean-up of a worker's children does not reach it
        import subprocess
        out = subprocess.run(["sh", "-c", "setsid sleep 600 >/dev/null 2>&1 & echo $!"], capture_output=True,
                             text=True, check=True)
        return int(out.stdout)

holder = Holder.remote()
print("up", ray.get(holder.start_helper.remote()), flush=True)
time.sleep(600)
"""


def test_processes_left_by_a_killed_driver_are_found_reported_and_stopped(tmp_path: Path) -> None:
    record = tmp_path / ".ray-instance.json"
    bystander = subprocess.Popen(["sleep", "300"], env={**os.environ, ENV: "another-run"})
    driver = subprocess.Popen([sys.executable, "-c", DRIVER.format(repo=str(REPO), record=str(record))],
                              stdout=subprocess.PIPE, text=True, start_new_session=True, cwd=tmp_path)
    try:
        assert driver.stdout is not None
        line = driver.stdout.readline().split()
        assert line[:1] == ["up"], "the driver never started its Ray instance"
        helper = int(line[1])
        token = json.loads(record.read_text())["token"]
        assert helper in [p.pid for p in instance_processes(token)]  # it inherited the instance's token
        os.killpg(driver.pid, signal.SIGKILL)  # the driver's own group: Ray's processes have their own
        driver.wait(timeout=30)
        time.sleep(2)
        left = instance_processes(token)  # Ray's own processes may still be exiting: whatever is alive now
        assert helper in [p.pid for p in left]

        said: list[str] = []
        found = stop_leftovers(str(record), said.append, grace_s=10)
        assert found == len(left)
        assert len(said) == 1 and f"{found} process(es) of this run's previous Ray instance" in said[0]
        assert str(helper) in said[0]
        assert instance_processes(token) == [] and not psutil.pid_exists(helper)
        assert not record.exists()
        assert bystander.poll() is None  # another instance's process is not touched
    finally:
        bystander.kill()
        bystander.wait(timeout=30)
        for p in instance_processes(json.loads(record.read_text())["token"]) if record.exists() else []:
            p.kill()


def test_a_record_of_another_host_or_a_live_driver_is_left_alone(tmp_path: Path) -> None:
    record = tmp_path / ".ray-instance.json"
    sleeper = subprocess.Popen(["sleep", "300"], env={**os.environ, ENV: "tok"})
    try:
        record.write_text(json.dumps({"token": "tok", "host": "elsewhere", "driver_pid": 1}))
        assert stop_leftovers(str(record), print) == 0 and sleeper.poll() is None
        # the recorded driver is alive and carries the token: its instance is in use
        record.write_text(json.dumps({"token": "tok", "host": socket.gethostname(), "driver_pid": sleeper.pid}))
        assert stop_leftovers(str(record), print) == 0 and sleeper.poll() is None
        assert [p.pid for p in instance_processes("tok")] == [sleeper.pid]
        assert stop_leftovers(str(tmp_path / "absent.json"), print) == 0
    finally:
        sleeper.kill()
        sleeper.wait(timeout=30)
    assert psutil.pid_exists(os.getpid())


RETRY = """
import logging, sys
sys.path.insert(0, {repo!r})
import ray
from orchestrator.ray_runtime import connect
from orchestrator.recipe.schema import RayConfig

real, calls = ray.init, []

def slow_node(**kwargs):  # what ray.init raises when the raylet takes over its fixed 30 s to register
    calls.append(kwargs)
    if len(calls) == 1:
        raise Exception("The current node timed out during startup. This could happen because some of the "
                        "raylet failed to startup or the GCS has become overloaded.")
    return real(**kwargs)

ray.init = slow_node
logging.basicConfig()
connect(RayConfig(num_cpus=1), log_to_driver=False, instance_record={record!r})
print("up", len(calls), ray.cluster_resources().get("CPU"), flush=True)
"""


def test_a_local_start_that_times_out_is_started_again(tmp_path: Path) -> None:
    record = tmp_path / ".ray-instance.json"
    done = subprocess.run([sys.executable, "-c", RETRY.format(repo=str(REPO), record=str(record))],
                          capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[:3] == ["up", "2", "1.0"]
    assert "did not come up in time" in done.stderr and "starting it again (2 of 3)" in done.stderr
    time.sleep(3)
    assert instance_processes(json.loads(record.read_text())["token"]) == []  # gone with their driver
