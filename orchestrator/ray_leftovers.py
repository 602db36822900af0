"""Processes of a run's local Ray instance that outlived its driver, found and stopped by the next run.

Ray's processes run in their own process groups: a SIGKILL of `pofa run` (an OOM killer, `kill -9` of
the group, a crashed container shell) leaves raylet, GCS and worker processes alive, holding CPUs,
memory and sometimes the checkpoint files the rerun needs. When pofa starts a local instance it puts
a token in the environment every process of that instance inherits (`POFA_RAY_INSTANCE`) and records
it in the run directory; the next run on the same host finds the processes that carry it, reports
them in one line, and stops them: those of that instance only, never another run's or a cluster's.
"""
from __future__ import annotations

import json
import os
import socket
import time
import uuid
from typing import Callable, Optional

import psutil

from pipelines.atomic import write_json_atomic

ENV = "POFA_RAY_INSTANCE"


def mark_instance(record_path: str) -> str:
    """Before a local `ray.init`: a fresh token in this process's environment (Ray's processes inherit
    it), recorded with the host and this driver's pid. Returns the token."""
    token = uuid.uuid4().hex
    os.environ[ENV] = token
    write_json_atomic({"token": token, "host": socket.gethostname(), "driver_pid": os.getpid(),
                       "started": time.time()}, record_path)
    return token


def instance_processes(token: str) -> list[psutil.Process]:
    """Live processes (other than this one) whose environment carries `token`."""
    found = []
    for proc in psutil.process_iter(["pid", "name"]):
        if proc.pid == os.getpid():
            continue
        try:
            if proc.environ().get(ENV) == token and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.Error, OSError):
            continue  # gone meanwhile, or another user's
    return found


def stop_instance(token: str, grace_s: float = 10.0) -> list[psutil.Process]:
    """SIGTERM every live process carrying `token`, SIGKILL what is left after `grace_s`; returns them."""
    procs = instance_processes(token)
    for p in procs:
        _signal(p, kill=False)
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        _signal(p, kill=True)
    psutil.wait_procs(alive, timeout=grace_s)
    return procs


def stop_leftovers(record_path: str, say: Callable[[str], None], grace_s: float = 10.0) -> int:
    """Stop what is left of the instance recorded at `record_path` (SIGTERM, then SIGKILL after
    `grace_s`); returns how many processes were found. Nothing is done for a record of another host
    or of a driver that is still alive."""
    record = _read(record_path)
    if record is None or record.get("host") != socket.gethostname():
        return 0
    if record.get("driver_pid") == os.getpid():
        return 0  # this process started that instance: it is in use
    if psutil.pid_exists(int(record.get("driver_pid", -1))):
        try:
            if psutil.Process(int(record["driver_pid"])).environ().get(ENV) == record["token"]:
                return 0  # that driver still runs (the run's lease says so too): its instance is in use
        except (psutil.Error, OSError):
            pass
    procs = instance_processes(str(record.get("token")))
    if procs:
        names = ", ".join(f"{p.pid} {_name(p)}" for p in procs[:8]) + (" ..." if len(procs) > 8 else "")
        say(f"pofa: {len(procs)} process(es) of this run's previous Ray instance (driver pid {record.get('driver_pid')}, "
            f"gone) still alive: {names}; stopping them")
        stop_instance(str(record["token"]), grace_s)
    try:
        os.remove(record_path)
    except OSError:
        pass
    return len(procs)


def _read(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("token") else None


def _name(proc: psutil.Process) -> str:
    try:
        cmd = proc.cmdline()
        return (cmd[0] if cmd else proc.name())[:60]
    except (psutil.Error, OSError):
        return "?"


def _signal(proc: psutil.Process, kill: bool) -> None:
    try:
        proc.kill() if kill else proc.terminate()
    except (psutil.Error, OSError):
        pass
