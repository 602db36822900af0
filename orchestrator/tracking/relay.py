"""Training workers' records reach MLflow through the driver: one process writes the run's store.

A rank-0 worker on another node cannot open the driver's SQLite store (on an object-store run it
would open an empty copy in its own node's mirror), and two processes writing one SQLite file is
asking for trouble. So the tracker shipped to the workers (`RelayTracker`) only hands its records to
a small Ray actor (`_Inbox`, fire-and-forget: training never waits), and a thread in the driver
(`TrackingRelay`) takes them from there and logs them through the session's own buffered trackers,
which keep them through an outage and deliver them when the store is back.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Callable, Mapping, Optional

logger = logging.getLogger("pofa.tracking")
_TAKE = 2000  # records per round trip to the inbox
FLUSH_TIMEOUT_S = 60.0


class _Inbox:
    """Records in arrival order, taken in batches by the driver."""

    def __init__(self) -> None:
        self.items: list[tuple] = []

    def put(self, item: tuple) -> None:
        self.items.append(item)

    def take(self, n: int) -> list[tuple]:
        out, self.items = self.items[:n], self.items[n:]
        return out

    def held(self) -> int:
        return len(self.items)


class RelayTracker:
    """The `workers.tracking.Tracker` a training worker gets: picklable (an actor handle and a key)."""

    def __init__(self, inbox: Any, key: str) -> None:
        self.inbox, self.key = inbox, key

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.inbox.put.remote(("metrics", self.key, {k: float(v) for k, v in metrics.items()}, int(step),
                               int(time.time() * 1000)))

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        # a path on the worker's node: the driver logs it once the file is in its own copy of the run
        self.inbox.put.remote(("artifact", self.key, os.path.abspath(local_path), artifact_path))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.inbox.put.remote(("tags", self.key, {str(k): str(v) for k, v in tags.items()}))

    def flush(self, timeout_s: float = FLUSH_TIMEOUT_S) -> None:
        """Wait until the inbox holds every record sent so far (an actor runs one caller's calls in
        order), so none is lost when the worker process ends right after; bounded, never a hang."""
        import ray

        try:
            ray.get(self.inbox.held.remote(), timeout=timeout_s)
        except Exception as exc:  # noqa: BLE001 - tracking never fails training
            logger.warning("pofa: tracking relay: records of %s not confirmed in %.0f s: %s", self.key, timeout_s, exc)


class TrackingRelay:
    """The driver's side: an inbox actor and the thread that empties it into `tracker_of(key)`."""

    def __init__(self, tracker_of: Callable[[str], Any], poll_s: float = 0.5,
                 observe: Optional[Callable[[str, int, Mapping[str, float]], None]] = None) -> None:
        import ray

        self.tracker_of, self.poll_s, self.observe = tracker_of, poll_s, observe
        self.inbox = ray.remote(num_cpus=0, max_concurrency=1)(_Inbox).remote()
        self.waiting: dict[str, list[tuple[str, Optional[str]]]] = {}  # key -> artifacts not on this node yet
        self._stop = threading.Event()
        # one drain at a time: a batch taken by the thread is dispatched before `settle` returns
        self._draining = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="pofa-tracking-relay", daemon=True)
        self._thread.start()

    def tracker(self, key: str) -> RelayTracker:
        return RelayTracker(self.inbox, key)

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.drain():
                self._stop.wait(self.poll_s)

    def drain(self) -> int:
        """Hand what the inbox holds to the session's trackers; returns how many records."""
        import ray

        with self._draining:
            try:
                items = ray.get(self.inbox.take.remote(_TAKE), timeout=FLUSH_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - Ray going down at exit: nothing more to relay
                logger.debug("pofa: tracking relay: %s", exc)
                return 0
            for item in items:
                try:
                    self._dispatch(item)
                except Exception as exc:  # noqa: BLE001 - one bad record must not stop the others
                    logger.warning("pofa: a tracking record from a worker was dropped: %s", exc)
            return len(items)

    def _dispatch(self, item: tuple) -> None:
        kind, key = item[0], item[1]
        tracker = self.tracker_of(key)
        if kind == "metrics":
            tracker.log_metrics(item[2], item[3], timestamp_ms=item[4])
            if self.observe is not None:
                self.observe(key, item[3], item[2])
        elif kind == "tags":
            tracker.set_tags(item[2])
        elif os.path.exists(item[2]):
            tracker.log_artifact(item[2], item[3])
        else:
            self.waiting.setdefault(key, []).append((item[2], item[3]))

    def settle(self, key: str) -> None:
        """A stage ended: what its workers sent is in, and its files are in this node's copy of the run."""
        while self.drain():
            pass
        for path, artifact_path in self.waiting.pop(key, []):
            if os.path.exists(path):
                self.tracker_of(key).log_artifact(path, artifact_path)
            else:
                logger.warning("pofa: artifact %s of %s is not on this node; not logged to MLflow", path, key)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        while self.drain():
            pass
