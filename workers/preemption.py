"""Preemption: a stage told to stop checkpoints at its current step and ends within the grace period.

Three ways the notice arrives, all ending in the same place (every rank sees it in the same step's
all-reduce, the step is checkpointed and the attempt ends as "preempted"):

- SIGTERM to the driver (`pofa run`, a job's entrypoint): the driver puts this run's key in Ray's
  key-value store (`request_run`);
- SIGTERM to a training worker process: its handler, installed when Ray starts the process
  (`install_worker_handler`, a Ray `worker_process_setup_hook`), sets a flag in that process;
- a node about to go away (a Kubernetes preStop hook running `pofa preempt-node`): the node's key.

A second SIGTERM, or the grace period running out, ends the process at once: the newest committed
checkpoint is intact, a half-written one is never loaded.
"""
from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
from typing import Callable, Optional

EXIT_CODE = 143  # 128 + SIGTERM, what schedulers expect from a process that honoured the signal
# For the job-level runtime env (`ray.init`, a job submission): Ray runs it in every worker process it
# starts for the job (an actor-level runtime env does not run setup hooks).
SETUP_HOOK = "workers.preemption.install_worker_handler"
_NAMESPACE = "pofa-preemption"
_local = threading.Event()  # set by this process's SIGTERM handler


class Preempted(RuntimeError):
    """The run stopped on a preemption notice after committing a checkpoint; rerun to resume."""

    def __init__(self, stage: str, step: Optional[int], where: Optional[str]) -> None:
        self.stage, self.step, self.where = stage, step, where
        at = f"at step {step}" if step is not None else "before its first checkpoint"
        super().__init__(f"[{stage}] preempted {at}" + (f" (checkpoint {where})" if where else "")
                         + ": rerun the same command to resume from it")


def run_key(run_where: str) -> str:
    return "run:" + hashlib.sha256(run_where.encode()).hexdigest()[:16]


def node_key(node_id: str) -> str:
    return f"node:{node_id}"


CLUSTER_KEY = "cluster"  # the head is going away: every run on the cluster stops


def _kv_put(key: str) -> None:
    from ray.experimental.internal_kv import _internal_kv_put

    _internal_kv_put(key, str(time.time()).encode(), overwrite=True, namespace=_NAMESPACE)


def _kv_time(key: str) -> Optional[float]:
    """When the notice under `key` was given (None: never)."""
    from ray.experimental.internal_kv import _internal_kv_get

    value = _internal_kv_get(key, namespace=_NAMESPACE)
    return float(value) if value is not None else None


def _kv_del(key: str) -> None:
    from ray.experimental.internal_kv import _internal_kv_del

    _internal_kv_del(key, namespace=_NAMESPACE)


def request_run(run_where: str) -> None:
    """The driver: every worker of this run stops at its next step."""
    _kv_put(run_key(run_where))


def request_node(node_id: str, whole_cluster: bool = False) -> None:
    """A node about to go away: the workers on it (and so their whole group) stop at the next step;
    `whole_cluster` (the head): every training run on the cluster does."""
    _kv_put(CLUSTER_KEY if whole_cluster else node_key(node_id))


def wait_for_workers_to_stop(node_id: str, timeout_s: float, poll_s: float = 1.0) -> bool:
    """Until no Ray Train worker is alive on the node (they stop after their checkpoint), at most
    `timeout_s`; True when they did."""
    from ray.util.state import list_actors

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive = list_actors(filters=[("node_id", "=", node_id), ("state", "=", "ALIVE")], limit=1000)
        if not any("TrainWorker" in (a.class_name or "") for a in alive):
            return True
        time.sleep(poll_s)
    return False


def clear_run(run_where: str) -> None:
    """At the start of a run: a notice left by an earlier, preempted attempt is not this one's."""
    _kv_del(run_key(run_where))


def install_worker_handler() -> None:
    """Ray `worker_process_setup_hook` for training workers: the first SIGTERM asks for a checkpoint
    and a clean stop, a second one gets Ray's own handler (the process exits).

    The hook runs before Ray's worker loop installs its handler (which exits at once), and the loop
    installs it through `ray._private.utils.set_sigterm_handler`: that call is wrapped so ours comes
    first (Ray is pinned; tests/workers/test_train_teacher.py fails if this stops working)."""
    import ray._private.utils as ray_utils

    install = ray_utils.set_sigterm_handler

    def chained(ray_handler: Callable) -> None:
        def handler(signum: int, frame: object) -> None:
            if _local.is_set():
                ray_handler(signum, frame)
            _local.set()

        install(handler)

    ray_utils.set_sigterm_handler = chained
    chained(lambda signum, frame: os._exit(EXIT_CODE))  # until Ray installs its own


class Watch:
    """What a training rank asks after every step: has this run, this node or this process been told
    to stop? The key-value store is asked at most once every `interval_s`."""

    def __init__(self, run_where: str, node_id: Optional[str], interval_s: float = 1.0) -> None:
        self.keys = [run_key(run_where), CLUSTER_KEY] + ([node_key(node_id)] if node_id else [])
        self.interval_s = interval_s
        self.started = time.time()  # a node notice older than this attempt was for an earlier one
        self._next = 0.0
        self._seen = False

    def requested(self) -> bool:
        if _local.is_set() or self._seen:
            return True
        now = time.monotonic()
        if now >= self._next:
            self._next = now + self.interval_s
            try:
                given = [_kv_time(k) for k in self.keys]
            except Exception:  # noqa: BLE001 - no Ray (tests) or a GCS blip: ask again next time
                return False
            run_notice, others = given[0], given[1:]  # the cluster's and the node's: only those for this attempt
            self._seen = run_notice is not None or any(t is not None and t >= self.started for t in others)
        return self._seen


_driver: Optional["DriverHandler"] = None  # this process's, while `pofa run` works


def driver_noticed() -> bool:
    """Did this (driver) process itself get the notice?"""
    return _driver is not None and _driver.noticed.is_set()


def run_must_stop(since: float) -> bool:
    """After an attempt ended on a notice: stop the run (the driver's SIGTERM, or the head going away
    since `since`), or not (a worker node's notice: the next attempt resumes on the nodes that remain)."""
    if driver_noticed():
        return True
    try:
        given = _kv_time(CLUSTER_KEY)
    except Exception:  # noqa: BLE001 - no answer from the cluster: it is going away
        return True
    return given is not None and given >= since


class graceful_stage:
    """Around a training run's fit(): the driver's SIGTERM is passed to the workers, not raised. Runs
    may overlap (concurrent fine-tuning runs): the driver stays graceful while any is in one."""

    def __enter__(self) -> None:
        if _driver is not None:
            with _driver.lock:
                _driver.graceful += 1

    def __exit__(self, *exc: object) -> None:
        if _driver is not None:
            with _driver.lock:
                _driver.graceful -= 1


class DriverHandler:
    """SIGTERM in the driver. While a training stage runs (`graceful`), the first signal asks its
    workers to checkpoint and stop (`on_notice`), and arms a timer that ends the process after
    `grace_s`; elsewhere (preprocessing, between stages) it raises Preempted at once, keeping what
    finished. A second signal ends the process at once."""

    def __init__(self, grace_s: float, on_notice: Callable[[], None], console: Callable[[str], None]) -> None:
        self.grace_s, self.on_notice, self.console = grace_s, on_notice, console
        self.graceful = 0  # training runs in progress (in fit())
        self.lock = threading.Lock()
        self.noticed = threading.Event()
        self._previous = None
        self._timer: Optional[threading.Timer] = None

    def install(self) -> None:
        global _driver
        previous = signal.signal(signal.SIGTERM, self._handle)
        if _driver is not self:  # installed again after Ray's start: keep the original to restore
            self._previous = previous
        _driver = self

    def uninstall(self) -> None:
        """The run ended (preempted or not) before the grace period did: no forced exit."""
        global _driver
        if self._timer is not None:
            self._timer.cancel()
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        _driver = None

    def _handle(self, signum: int, frame: object) -> None:
        if self.noticed.is_set():
            self.console("pofa: second SIGTERM: stopping now; the newest committed checkpoint is intact")
            os._exit(EXIT_CODE)
        self.noticed.set()
        if not self.graceful:
            raise Preempted("pofa", None, None)
        self.console(f"pofa: SIGTERM: checkpointing at the current step, then stopping (grace {self.grace_s:g} s)")
        # the store call and the timer run off the signal handler: it must return at once
        threading.Thread(target=self._notice, name="pofa-preemption", daemon=True).start()

    def _notice(self) -> None:
        self._timer = threading.Timer(self.grace_s, self._expire)
        self._timer.daemon = True
        self._timer.start()
        try:
            self.on_notice()
        except Exception as exc:  # noqa: BLE001 - the timer still bounds the wait
            self.console(f"pofa: could not pass the preemption notice to the workers ({exc})")

    def _expire(self) -> None:
        self.console(f"pofa: grace period of {self.grace_s:g} s is over: stopping now; the newest committed "
                     "checkpoint is intact")
        os._exit(EXIT_CODE)


def block_sigterm_for_children() -> Callable[[], None]:
    """Block SIGTERM while a local Ray instance starts its processes (they inherit the mask), so a
    SIGTERM to the whole process group reaches the driver only, which then stops the run in order.
    Returns the function that unblocks it again for this process."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    return lambda: signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
