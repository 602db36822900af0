"""`AsyncMlflowTracker`: the MLflow implementation of `workers.tracking.Tracker`.

The training loop calls it on rank 0 at every step, so nothing here may wait on the network:
records go into an in-memory queue and a background thread sends them with `log_batch` every
`flush_interval_s`. When the tracking server is down the thread keeps the records, retries with
exponential backoff and warns once per outage; when the server is back everything is delivered in
order. Only the records queued since the last successful send are lost if the process dies.

Ray pickles the tracker to ship it to the rank-0 worker; only (tracking_uri, run_id, settings) are
pickled, the client and thread are created again, lazily, in the receiving process.
"""
from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from tenacity import Retrying, retry_if_result

from orchestrator.tracking.config import TrackingConfig, shown
from orchestrator.tracking.connection import apply_request_settings
from orchestrator.tracking.retry import backoff

logger = logging.getLogger("pofa.tracking")
_THREAD_PREFIX = "pofa-mlflow-"

# MLflow's per-request limits for log_batch (mlflow.utils.validation).
_MAX_METRICS = 1000
_MAX_TAGS = 100
_MAX_TAG_VALUE = 8000
# Errors that will not go away by retrying: the records are dropped (with a warning) instead of
# blocking everything queued behind them.
_PERMANENT_CODES = frozenset(
    {"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE"}
)


@dataclass(frozen=True)
class SenderSettings:
    flush_interval_s: float = 5.0
    flush_timeout_s: float = 10.0
    request_timeout_s: float = 30.0
    request_max_retries: int = 0
    retry_initial_s: float = 1.0
    retry_max_s: float = 30.0

    @classmethod
    def from_config(cls, config: TrackingConfig) -> "SenderSettings":
        return cls(
            flush_interval_s=config.flush_interval_s,
            flush_timeout_s=config.flush_timeout_s,
            request_timeout_s=config.request_timeout_s,
            request_max_retries=config.request_max_retries,
            retry_initial_s=config.retry_initial_s,
            retry_max_s=config.retry_max_s,
        )


# Queue records are plain tuples-with-names: the caller's thread never imports MLflow (a first
# import takes seconds); the sender converts them to MLflow entities.
@dataclass(frozen=True)
class _Metric:
    key: str
    value: float
    timestamp: int
    step: int


@dataclass(frozen=True)
class _Tag:
    key: str
    value: str


@dataclass(frozen=True)
class _Artifact:
    local_path: str
    artifact_path: str | None


class RunNotCreatedYet(ConnectionError):
    """The run the records belong to is not in the store yet (the store was unreachable when the stage
    started): the records wait, as during an outage."""


class AsyncMlflowTracker:
    """Buffered, non-blocking MLflow logging into one run, identified by an explicit run id, or by a
    function that gives it once the run exists (None until then: records wait, as during an outage)."""

    def __init__(self, tracking_uri: str, run_id: str | Callable[[], str | None],
                 settings: SenderSettings | None = None) -> None:
        self.tracking_uri = tracking_uri
        self._run_id = run_id
        self.settings = settings or SenderSettings()
        self._reset_runtime()

    @property
    def run_id(self) -> str:
        run_id = self._run_id() if callable(self._run_id) else self._run_id
        if run_id is None:
            raise RunNotCreatedYet("its MLflow run is created once the store answers")
        return run_id

    # -- pickling: identity only; the client, queue and thread belong to one process ------------
    def __getstate__(self) -> dict[str, Any]:
        return {"tracking_uri": self.tracking_uri, "run_id": self.run_id, "settings": self.settings}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["tracking_uri"], state["run_id"], state["settings"])

    def _reset_runtime(self) -> None:
        self._pid = os.getpid()
        self._cond = threading.Condition()
        self._start_lock = threading.Lock()
        self._queue: deque[Any] = deque()
        self._queued = 0  # records ever queued
        self._done = 0  # records delivered (or dropped as undeliverable)
        self._dropped = 0
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: Any = None
        self._stop_deadline: float | None = None
        self._outage_since: float | None = None
        self._atexit_registered = False

    # -- the Tracker protocol ---------------------------------------------------------------------
    def log_metrics(self, metrics: Mapping[str, float], step: int, timestamp_ms: int | None = None) -> None:
        timestamp = int(time.time() * 1000) if timestamp_ms is None else int(timestamp_ms)
        records = []
        for key, value in metrics.items():
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"metric {key!r}: value {value!r} is not a number") from None
            records.append(_Metric(str(key), number, timestamp, int(step)))
        self._enqueue(records)

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        path = Path(local_path)
        if not path.exists():
            raise ValueError(f"artifact {str(local_path)!r} does not exist")
        self._enqueue([_Artifact(str(path.resolve()), artifact_path)])

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._enqueue([_Tag(str(k), str(v)[:_MAX_TAG_VALUE]) for k, v in tags.items()])

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until everything queued so far is delivered; True if it was.

        Waits at most `timeout_s` (default: settings.flush_timeout_s) and not at all while the
        server is known to be down: the records stay queued and are sent when it is back.
        """
        self._check_process()
        timeout = self.settings.flush_timeout_s if timeout_s is None else timeout_s
        with self._cond:
            target = self._queued
            if self._done >= target:
                return True
            if self._outage_since is not None:
                return False
        self._wake.set()
        with self._cond:
            self._cond.wait_for(
                lambda: self._done >= target or self._outage_since is not None, timeout
            )
            return self._done >= target

    # -- extras for the orchestrator and tests ----------------------------------------------------
    def close(self, timeout_s: float | None = None) -> bool:
        """Deliver what is queued (waiting at most `timeout_s`) and stop the sender thread.

        Returns True if nothing was left undelivered. Logging again later starts a new thread.
        """
        self._check_process()
        timeout = self.settings.flush_timeout_s if timeout_s is None else timeout_s
        thread = self._thread
        if thread is not None and thread.is_alive():
            self._stop_deadline = time.monotonic() + timeout
            self._wake.set()
            thread.join(timeout + self.settings.request_timeout_s)
        with self._cond:
            left = self._queued - self._done
        if left:
            logger.warning(
                "pofa: %d tracking records for MLflow run %s could not be delivered to %s",
                left, self._name(), shown(self.tracking_uri),
            )
        return left == 0

    @property
    def pending(self) -> int:
        """Records queued but not yet delivered."""
        with self._cond:
            return self._queued - self._done

    @property
    def dropped(self) -> int:
        """Records the store refused as invalid (e.g. a bad metric name), logged and skipped."""
        return self._dropped

    @property
    def in_outage(self) -> bool:
        return self._outage_since is not None

    # -- internals --------------------------------------------------------------------------------
    def _name(self) -> str:
        try:
            return self.run_id
        except RunNotCreatedYet:
            return "(not created yet)"

    def _check_process(self) -> None:
        # A forked child (e.g. a DataLoader worker) inherits a copy without the sender thread.
        if self._pid != os.getpid():
            self._reset_runtime()

    def _enqueue(self, records: list[Any]) -> None:
        if not records:
            return
        self._check_process()
        with self._cond:
            self._queue.extend(records)
            self._queued += len(records)
        self._ensure_thread()

    def _ensure_thread(self) -> None:
        thread = self._thread
        if thread is not None and thread.is_alive():
            if self._stop_deadline is None:
                return
            thread.join()  # a close() is in progress: let it finish, then start again
        with self._start_lock:
            if self._thread is not None and self._thread.is_alive():
                return  # started meanwhile by another caller
            self._stop_deadline = None
            self._wake.clear()
            self._thread = threading.Thread(
                target=self._run, name=f"{_THREAD_PREFIX}{self._name()[:8]}", daemon=True
            )
            self._thread.start()
        _quiet_sender_retries()
        if not self._atexit_registered:
            # A normal interpreter exit delivers what is left (bounded by flush_timeout_s).
            atexit.register(self.close)
            self._atexit_registered = True

    def _run(self) -> None:
        # Not a retry itself: one delivery round per flush interval, or at once when close() wakes
        # it. A round retries a down store (shared backoff) until it is back or close()'s deadline
        # passes; then the thread ends and close() reports what was not delivered.
        deliver = Retrying(
            retry=retry_if_result(lambda delivered: not delivered),
            wait=backoff(self.settings.retry_initial_s, self.settings.retry_max_s),
            stop=lambda _: self._past_stop_deadline(),
            sleep=self._pause,
            retry_error_callback=lambda _: False,
        )
        while True:
            if self._stop_deadline is None:
                self._wake.wait(self.settings.flush_interval_s)
            self._wake.clear()
            stopping = self._stop_deadline is not None  # before delivering: a later close() gets a round
            deliver(self._drain)
            if stopping:
                return

    def _pause(self, seconds: float) -> None:
        """The wait between two tries: cut short by close(), and never past its deadline."""
        deadline = self._stop_deadline
        if deadline is not None:
            seconds = min(seconds, max(0.0, deadline - time.monotonic()))
        self._wake.wait(seconds)
        self._wake.clear()

    def _past_stop_deadline(self) -> bool:
        deadline = self._stop_deadline
        return deadline is not None and time.monotonic() >= deadline

    def _drain(self) -> bool:
        """Send queued records in order until none are left (True) or the store fails (False)."""
        while True:
            with self._cond:
                batch = self._take_batch()
            if not batch:
                return True
            try:
                self._send(batch)
            except Exception as exc:  # noqa: BLE001 - any failure must stay in this thread
                if not _is_permanent(exc):
                    self._enter_outage(exc)
                    return False
                if not self._send_one_by_one(batch, exc):
                    return False
            self._leave_outage()
            with self._cond:
                for _ in batch:
                    self._queue.popleft()
                self._done += len(batch)
                self._cond.notify_all()

    def _take_batch(self) -> list[Any]:
        """The longest queue prefix one request can carry: metrics and tags, or one artifact."""
        batch: list[Any] = []
        metrics = tags = 0
        for record in self._queue:
            if isinstance(record, _Artifact):
                return batch or [record]
            is_metric = isinstance(record, _Metric)
            if is_metric and metrics == _MAX_METRICS or not is_metric and tags == _MAX_TAGS:
                break
            metrics += is_metric
            tags += not is_metric
            batch.append(record)
            if len(batch) >= _MAX_METRICS:
                break
        return batch

    def _send(self, batch: list[Any]) -> None:
        client = self._get_client()
        if isinstance(batch[0], _Artifact):
            artifact = batch[0]
            if Path(artifact.local_path).is_dir():
                client.log_artifacts(self.run_id, artifact.local_path, artifact.artifact_path)
            else:
                client.log_artifact(self.run_id, artifact.local_path, artifact.artifact_path)
            return
        from mlflow.entities import Metric, RunTag

        metrics = [Metric(r.key, r.value, r.timestamp, r.step) for r in batch if isinstance(r, _Metric)]
        tags = [RunTag(r.key, r.value) for r in batch if isinstance(r, _Tag)]
        client.log_batch(self.run_id, metrics=metrics, tags=tags, synchronous=True)

    def _send_one_by_one(self, batch: list[Any], first_error: Exception) -> bool:
        """After a permanent error, find and drop only the records the store refuses."""
        if len(batch) == 1:
            self._drop(batch[0], first_error)
            return True
        for index, record in enumerate(batch):
            try:
                self._send([record])
            except Exception as exc:  # noqa: BLE001
                if not _is_permanent(exc):
                    # Keep what was not sent; what was sent is removed from the queue now.
                    with self._cond:
                        for _ in range(index):
                            self._queue.popleft()
                        self._done += index
                        self._cond.notify_all()
                    self._enter_outage(exc)
                    return False
                self._drop(record, exc)
        return True

    def _drop(self, record: Any, exc: Exception) -> None:
        self._dropped += 1
        # The first few in full, then a count now and then: a wrong run id must not flood the log.
        if self._dropped <= 5 or self._dropped % 1000 == 0:
            logger.warning(
                "pofa: MLflow refused a tracking record for run %s and it is dropped (%d so far): "
                "%r (%s)", self._name(), self._dropped, record, _short(exc),
            )

    def _enter_outage(self, exc: Exception) -> None:
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            logger.warning(
                "pofa: MLflow tracking at %s is not answering (%s). Training continues; %d records "
                "are kept in memory and sent when it is back (retrying with backoff up to %g s).",
                shown(self.tracking_uri), _short(exc), self.pending, self.settings.retry_max_s,
            )
            with self._cond:
                self._cond.notify_all()  # flush() callers stop waiting on a known-down server

    def _leave_outage(self) -> None:
        if self._outage_since is not None:
            down_for = time.monotonic() - self._outage_since
            self._outage_since = None
            logger.warning(
                "pofa: MLflow tracking at %s is back after %.0f s; sending %d buffered records.",
                shown(self.tracking_uri), down_for, self.pending,
            )

    def _get_client(self) -> Any:
        if self._client is None:
            from mlflow import MlflowClient

            apply_request_settings(self.settings.request_timeout_s, self.settings.request_max_retries)
            self._client = MlflowClient(self.tracking_uri)
        return self._client


class _SenderThreadFilter(logging.Filter):
    """Drops urllib3's per-attempt retry warnings from sender threads: one outage, one warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not threading.current_thread().name.startswith(_THREAD_PREFIX)


_FILTER = _SenderThreadFilter()


def _quiet_sender_retries() -> None:
    urllib3_logger = logging.getLogger("urllib3.connectionpool")
    if _FILTER not in urllib3_logger.filters:
        urllib3_logger.addFilter(_FILTER)


def _is_permanent(exc: Exception) -> bool:
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
        return True
    code = getattr(exc, "error_code", None)
    if code not in _PERMANENT_CODES:
        return False
    # A proxy or a restarting server can answer 4xx for a moment; only trust codes MLflow sent.
    return "Max retries exceeded" not in str(exc)


def _short(exc: Exception) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 300 else text[:300] + "..."
