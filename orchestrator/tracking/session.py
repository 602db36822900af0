"""One pipeline run in MLflow: a parent run, a nested run per stage, resumable by run directory.

The orchestrator opens a `TrackingSession` per `pofa run`, calls `start_stage` / `end_stage`
around each stage it executes, and hands `session.tracker(stage)` (picklable) to the training
loop. All MLflow calls use explicit run ids through `MlflowClient`: the fluent API keeps its
active run per thread, which makes extra runs when Ray tasks log (see pitfalls).
"""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar

from workers.run_layout import RunLayout
from workers.tracking import NullTracker, Tracker

from orchestrator.tracking.config import ResolvedStore, TrackingConfig, default_store_uri, resolve_store, shown
from orchestrator.tracking.connection import (
    TrackingUnreachableError,
    apply_request_settings,
    check_reachable,
)
from orchestrator.tracking.datasets import DatasetRecord
from orchestrator.tracking.kept_calls import KeptCalls
from orchestrator.tracking.models import log_hf_model
from orchestrator.tracking.params import flatten_params
from orchestrator.tracking.registry import RunRegistry, StageEntry, StoreEntry
from orchestrator.tracking.relocate import LOCAL_STORE_KEY, relocate_store
from orchestrator.tracking.retry import retry_transient
from orchestrator.tracking.tags import (
    PARENT_RUN_TAG,
    RUN_STATUS_TAG,
    STAGE_STATUS_TAG,
    STAGE_TAG,
    default_tags,
)
from orchestrator.tracking.tracker import AsyncMlflowTracker, SenderSettings
from orchestrator.tracking.ui import how_to_view, mlflow_ui_command

logger = logging.getLogger("pofa.tracking")
T = TypeVar("T")
TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")
_PARAMS_PER_REQUEST = 100


class TrackingSession:
    """MLflow bookkeeping of one run directory. With `enabled: false` every method is a no-op."""

    def __init__(self, config: TrackingConfig, run_dir: RunLayout | str | os.PathLike[str]) -> None:
        self.config = config
        self.layout = run_dir if isinstance(run_dir, RunLayout) else RunLayout.open(str(run_dir))
        self.run_dir = Path(self.layout.root)
        self.enabled = config.enabled
        self.store: ResolvedStore = resolve_store(config, self.layout)
        # the run directory's own database is found by that name, wherever the directory (or this
        # node's mirror of it) sits; other stores by their URI
        self._key = LOCAL_STORE_KEY if self.store.uri == default_store_uri(self.layout) else self.store.uri
        self.settings = SenderSettings.from_config(config)
        self._registry = RunRegistry.load(self.layout.tracking_registry) if self.enabled else RunRegistry()
        self._entry: StoreEntry | None = None
        self._trackers: dict[str | None, AsyncMlflowTracker] = {}
        self._client: Any = None
        self.resumed = False
        self._relay: Any = None  # TrackingRelay, once a worker needs a tracker
        # (key, step, metrics) of every step a worker logs: the console's live line
        self.observer: Callable[[str, int, Mapping[str, float]], None] | None = None
        # calls that need the store while it does not answer: made in order once it does
        self._lock = threading.RLock()
        self._kept = KeptCalls(config, shown(self.uri))

    # -- opening ----------------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        config: TrackingConfig,
        run_dir: RunLayout | str | os.PathLike[str],
        *,
        recipe: Mapping[str, Any] | None = None,
        run_name: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> "TrackingSession":
        """Check the store, then find this run directory's parent run or create it.

        `recipe` (the resolved recipe as a dict) is logged as flattened params on the parent.
        A store that does not answer does not stop the run: the session warns, keeps every record
        and call, and delivers them in order once it answers. A setting that cannot work (not an
        MLflow server, a folder that cannot be written, wrong credentials) fails at once.
        """
        session = cls(config, run_dir)
        if session.enabled:
            apply_request_settings(config.request_timeout_s, config.request_max_retries)
            if session.is_run_store:
                session._relocate()
            name = run_name or session.run_dir.name
            all_tags = {**default_tags(), **dict(tags or {})}  # the caller adds Ray address and workers

            def open_parent() -> None:
                check_reachable(session.uri, config.connect_timeout_s)
                session._open_parent(name, all_tags)

            session._boundary(open_parent)
            if recipe is not None:
                session.log_params(flatten_params(recipe))
        return session

    @property
    def uri(self) -> str:
        return self.store.uri

    @property
    def is_run_store(self) -> bool:
        """The store is the run directory's own `mlflow.db` (not a server or another database)."""
        return self._key == LOCAL_STORE_KEY

    @property
    def parent_run_id(self) -> str | None:
        return self._entry.parent_run_id if self._entry else None

    @property
    def experiment_id(self) -> str | None:
        return self._entry.experiment_id if self._entry else None

    def _relocate(self) -> None:
        """A copied or moved run: its store's artifact locations are pointed at where the folder is now."""
        import sqlite3

        try:
            relocate_store(self.layout)
        except sqlite3.Error as exc:  # MLflow reports the store's state itself when the run opens it
            logger.warning("pofa: could not update the MLflow store of %s to its new place: %s", self.run_dir, exc)

    def _open_parent(self, run_name: str, tags: dict[str, str]) -> None:
        entry = self._registry.stores.get(self._key) or self._registry.stores.get(self.uri)
        if entry is not None and self._run_usable(entry.parent_run_id):
            self.resumed = True
            self._reopen(entry.parent_run_id)
            self._retry("tag the resumed parent run", lambda: self._set_tags_now(entry.parent_run_id, tags))
        else:
            if entry is not None:
                logger.warning(
                    "pofa: MLflow run %s recorded in %s is gone from %s; starting a new parent run",
                    entry.parent_run_id, self.layout.tracking_registry, self.uri,
                )
            experiment_id = self._retry("find the MLflow experiment", self._get_or_create_experiment)
            run = self._retry(
                "create the parent run",
                lambda: self.client.create_run(experiment_id, tags=tags, run_name=run_name),
            )
            entry = StoreEntry(experiment_id=experiment_id, parent_run_id=run.info.run_id)
        entry.status = "RUNNING"
        self._entry = entry
        self._registry.stores.pop(self.uri, None)  # an entry from before stores were keyed by name
        self._registry.stores[self._key] = entry
        self._registry.save(self.layout.tracking_registry)

    def _get_or_create_experiment(self) -> str:
        name = self.config.experiment
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            return self.client.create_experiment(name, artifact_location=self.store.artifact_location)
        if experiment.lifecycle_stage == "deleted":
            raise ValueError(
                f"tracking.experiment {name!r} is deleted in {shown(self.uri)}; restore it in MLflow "
                "or choose another tracking.experiment"
            )
        return experiment.experiment_id

    # -- stages -----------------------------------------------------------------------------------
    def start_stage(
        self,
        key: str,
        *,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None,
        fresh: bool = False,
    ) -> str | None:
        """The nested run of stage (or sub-run) `key`, e.g. "teacher" or "finetune/sst2/seed1".

        `fresh`: never reuse the recorded run (the stage restarts from scratch with another config).

        An unfinished run recorded for `key` is reused (resume); a finished one means the stage
        is run again, which gets a new nested run. The parent of "a/b/c" is the run of the
        nearest started prefix ("a/b", then "a"), else the pipeline's parent run.
        """
        if not self.enabled:
            return None
        return self._boundary(lambda: self._start_stage(key, params, tags, fresh))

    def _start_stage(self, key: str, params: Mapping[str, Any] | None, tags: Mapping[str, str] | None,
                     fresh: bool) -> str:
        entry = self._require_entry()
        stage = entry.stages.get(key)
        stage_tags = {STAGE_TAG: key, STAGE_STATUS_TAG: "running", **dict(tags or {})}
        if stage is not None and not fresh and stage.status != "FINISHED" and self._run_usable(stage.run_id):
            self._reopen(stage.run_id)
            run_id = stage.run_id
            self._retry(f"tag stage {key!r}", lambda: self._set_tags_now(run_id, stage_tags))
        else:
            parent = self._parent_of(key)
            run = self._retry(
                f"create the MLflow run of stage {key!r}",
                lambda: self.client.create_run(
                    entry.experiment_id, tags={PARENT_RUN_TAG: parent, **stage_tags}, run_name=key
                ),
            )
            run_id = run.info.run_id
        entry.stages[key] = StageEntry(run_id=run_id, status="RUNNING")
        self._registry.save(self.layout.tracking_registry)
        if params:
            self._log_params(flatten_params(params), key)
        return run_id

    def end_stage(self, key: str, status: str = "FINISHED") -> None:
        """Deliver what the orchestrator logged for `key`, then mark its run FINISHED/FAILED/KILLED."""
        if not self.enabled:
            return
        status = _check_status(status)
        if self._relay is not None:
            self._relay.settle(key)  # what the stage's workers sent, and the files they logged

        def end() -> None:
            entry = self._require_entry()
            if key not in entry.stages:
                raise ValueError(f"stage {key!r} was never started in this tracking session")
            run_id = entry.stages[key].run_id
            tracker = self._trackers.get(key)
            if tracker is not None:
                tracker.flush()
            self._terminate(run_id, status, f"stage {key!r}", STAGE_STATUS_TAG)
            entry.stages[key].status = status
            self._registry.save(self.layout.tracking_registry)

        self._boundary(end)

    def stage_run_id(self, key: str) -> str | None:
        if self._entry is None or key not in self._entry.stages:
            return None
        return self._entry.stages[key].run_id

    def finish(self, status: str = "FINISHED") -> None:
        """End of the pipeline: deliver everything buffered here and close the parent run."""
        if not self.enabled:
            return
        status = _check_status(status)
        if self._relay is not None:
            self._relay.close()
            self._relay = None

        def finish() -> None:
            entry = self._require_entry()
            for tracker in self._trackers.values():
                tracker.close()
            self._terminate(entry.parent_run_id, status, "the pipeline run", RUN_STATUS_TAG)
            entry.status = status
            self._registry.save(self.layout.tracking_registry)

        self._boundary(finish)
        left = self._kept.settle(answered_before=self._entry is not None)
        if left:
            logger.warning("pofa: MLflow at %s never answered during this run: %d call(s) and their records "
                           "were not delivered; each stage's metrics.jsonl holds its metrics", shown(self.uri), left)

    # -- logging ----------------------------------------------------------------------------------
    def tracker(self, key: str | None = None) -> Tracker:
        """The non-blocking tracker of stage `key` (None: the parent run), for this (the driver) process."""
        if not self.enabled:
            return NullTracker()
        return self._tracker(key)

    def worker_tracker(self, key: str) -> Tracker:
        """The tracker to ship to a stage's training workers: their records reach the store through
        this process, the only one that writes it (`relay.py`). Needs Ray. With tracking disabled the
        records still come, for the console's live line, and go no further."""
        if self._relay is None:
            from orchestrator.tracking.relay import TrackingRelay

            self._relay = TrackingRelay(self._tracker if self.enabled else (lambda key: NullTracker()),
                                        observe=self._observe)
        return self._relay.tracker(key)

    def _observe(self, key: str, step: int, metrics: Mapping[str, float]) -> None:
        if self.observer is not None:
            self.observer(key, step, metrics)

    def log_params(self, params: Mapping[str, str], key: str | None = None) -> None:
        """Record params now (synchronously): a value differing from the recorded one is an error."""
        if not self.enabled or not params:
            return
        self._boundary(lambda: self._log_params(params, key))

    def _log_params(self, params: Mapping[str, str], key: str | None) -> None:
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException

        run_id = self._run_id_of(key)
        items = [Param(k, str(v)) for k, v in params.items()]
        for start in range(0, len(items), _PARAMS_PER_REQUEST):
            chunk = items[start : start + _PARAMS_PER_REQUEST]
            try:
                self._retry("log params", lambda: self.client.log_batch(run_id, params=chunk))
            except MlflowException as exc:
                raise ValueError(
                    f"MLflow run {run_id} of {self.run_dir} already records different values for "
                    f"these params ({str(exc)[:500]}); the run directory belongs to another recipe: "
                    "use a new run directory"
                ) from exc

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0, key: str | None = None) -> None:
        """Buffered, like the training loop's tracker (e.g. the preprocess manifest's statistics)."""
        if self.enabled:
            self._tracker(key).log_metrics(metrics, step)

    def log_artifact(self, local_path: str | os.PathLike[str], artifact_path: str | None = None,
                     key: str | None = None) -> None:
        """Buffered upload of a file or folder (recipe, manifests, PNGs) to stage `key`'s run."""
        if self.enabled:
            self._tracker(key).log_artifact(str(local_path), artifact_path)

    def set_tags(self, tags: Mapping[str, str], key: str | None = None) -> None:
        if self.enabled:
            self._tracker(key).set_tags(tags)

    def log_model(self, model_dir: str | os.PathLike[str], *, key: str | None = None,
                  name: str = "model", task: str = "fill-mask",
                  registered_model_name: str | None = None, metrics: Mapping[str, float] | None = None,
                  params: Mapping[str, Any] | None = None, step: int = 0) -> str | None:
        """Log an exported HF folder as an MLflow transformers model with its metrics and params (the
        config that made it) at training step `step`; returns its model URI."""
        if not self.enabled:
            return None
        # MLflow links the run's metrics at `step` to the model when it is logged: they must be in the
        # store by then, not in the relay's queue or the stage tracker's buffer.
        if self._relay is not None:
            self._relay.settle(key)
        tracker = self._trackers.get(key)
        if tracker is not None:
            tracker.flush()
        source = self.layout.rel(str(model_dir)) if self.layout.contains(str(model_dir)) else None
        flat = flatten_params(params) if params else None
        return self._boundary(lambda: log_hf_model(self.uri, self._run_id_of(key), model_dir, name=name, task=task,
                                                   registered_model_name=registered_model_name, metrics=metrics,
                                                   params=flat, source=source, step=step))

    def log_datasets(self, records: Sequence[DatasetRecord], key: str | None = None) -> None:
        """Record the data stage `key` (None: the parent run) trained on or wrote, as MLflow dataset inputs."""
        if not self.enabled or not records:
            return
        from orchestrator.tracking.datasets import to_inputs

        self._boundary(lambda: self._retry("log the datasets", lambda: self.client.log_inputs(
            self._run_id_of(key), datasets=to_inputs(list(records)))))

    def log_stage_plots(self, key: str, out_dir: str | os.PathLike[str]) -> list[Path]:
        """Draw `loss.png` / `sparsity.png` from what stage `key` logged and attach them to its run.

        Reads the metric history from the store, so call it after the stage's trackers flushed.
        """
        if not self.enabled:
            return []
        from orchestrator.tracking.plots import stage_plots

        def draw() -> list[Path]:
            paths = self._retry("read the metric history",
                                lambda: stage_plots(self.client, self._run_id_of(key), out_dir))
            for path in paths:
                self.log_artifact(path, "plots", key=key)
            return paths

        return self._boundary(draw) or []

    def flush(self, timeout_s: float | None = None) -> bool:
        return all([t.flush(timeout_s) for t in self._trackers.values()])

    def how_to_view(self) -> str | None:
        """The console line with the exact `mlflow ui` command (or server URL) for this run."""
        if not self.enabled or self._entry is None:
            return None
        return how_to_view(self.uri, self._entry.experiment_id, self._entry.parent_run_id)

    def ui_command(self) -> str | None:
        return mlflow_ui_command(self.uri) if self.enabled else None

    # -- internals --------------------------------------------------------------------------------
    @property
    def client(self) -> Any:
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(self.uri)
        return self._client

    def _tracker(self, key: str | None) -> AsyncMlflowTracker:
        with self._lock:
            if key not in self._trackers:
                # the run id once it exists: records logged before (the store was down) wait for it
                self._trackers[key] = AsyncMlflowTracker(self.uri, lambda: self._known_run_id(key), self.settings)
            return self._trackers[key]

    def _known_run_id(self, key: str | None) -> str | None:
        if self._entry is None:
            return None
        if key is None:
            return self._entry.parent_run_id
        stage = self._entry.stages.get(key)
        return stage.run_id if stage is not None else None

    # -- a store that does not answer -----------------------------------------------------------
    def _boundary(self, call: Callable[[], T]) -> T | None:
        """A call that needs the store: made now, or kept and made in order once the store answers."""
        return self._kept.call(call)

    def _run_id_of(self, key: str | None) -> str:
        entry = self._require_entry()
        if key is None:
            return entry.parent_run_id
        if key not in entry.stages:
            raise ValueError(f"stage {key!r} has no MLflow run yet: call start_stage({key!r}) first")
        return entry.stages[key].run_id

    def _require_entry(self) -> StoreEntry:
        if self._entry is None:
            raise RuntimeError("tracking session is not open: use TrackingSession.open(...)")
        return self._entry

    def _parent_of(self, key: str) -> str:
        entry = self._require_entry()
        parts = key.split("/")
        for cut in range(len(parts) - 1, 0, -1):
            prefix = "/".join(parts[:cut])
            if prefix in entry.stages:
                return entry.stages[prefix].run_id
        return entry.parent_run_id

    def _run_usable(self, run_id: str) -> bool:
        """The run still exists in this store and is not deleted."""
        from mlflow.exceptions import MlflowException

        try:
            run = self._retry("look up a recorded run", lambda: self.client.get_run(run_id))
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return False
            raise
        return run.info.lifecycle_stage != "deleted"

    def _reopen(self, run_id: str) -> None:
        # A run whose process died stays RUNNING (mlflow#4248); one that failed is set back.
        self._retry("reopen a run", lambda: self.client.update_run(run_id, status="RUNNING"))

    def _set_tags_now(self, run_id: str, tags: Mapping[str, str]) -> None:
        if tags:
            from mlflow.entities import RunTag

            self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def _terminate(self, run_id: str, status: str, what: str, status_tag: str) -> None:
        def mark() -> None:
            self._set_tags_now(run_id, {status_tag: status.lower()})
            self.client.set_terminated(run_id, status)

        try:
            self._retry(f"mark {what} {status}", mark)
        except TrackingUnreachableError as exc:
            # The work itself is done and recorded in the run directory; only MLflow lags.
            logger.warning("pofa: %s", exc)

    def _retry(self, what: str, call: Callable[[], T]) -> T:
        """Retry a stage-boundary call while the store is down, up to boundary_retry_s."""
        return retry_transient(
            call, what=what, uri=self.uri, initial_s=self.config.retry_initial_s,
            max_s=self.config.retry_max_s, give_up_after_s=self.config.boundary_retry_s,
        )


def _check_status(status: str) -> str:
    value = status.upper()
    if value not in TERMINAL_STATUSES:
        raise ValueError(f"status {status!r}: expected one of {', '.join(TERMINAL_STATUSES)}")
    return value
