"""The `tracking` recipe section and how it resolves to a concrete MLflow store."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, field_validator

from workers.run_layout import RunLayout


EXPORT_NAME = re.compile(r"teacher|student|finetune/[A-Za-z0-9_-]+")


class TrackingConfig(BaseModel):
    """Where and how a pipeline run is recorded in MLflow."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    # None: MLFLOW_TRACKING_URI if set, else a SQLite store inside the run directory.
    uri: str | None = None
    experiment: str = "pofa"
    # The background sender delivers buffered records this often; a crash loses at most this much.
    flush_interval_s: float = Field(default=5.0, gt=0)
    # How long flush() at a checkpoint or stage end may wait for delivery before giving up
    # (records stay buffered and are sent later; training never waits longer than this).
    flush_timeout_s: float = Field(default=10.0, ge=0)
    # Per-request limits for HTTP stores: short, because the sender retries on its own with backoff.
    request_timeout_s: float = Field(default=30.0, gt=0)
    request_max_retries: int = Field(default=0, ge=0)
    # Backoff of the sender's own retry loop while the tracking server is down.
    retry_initial_s: float = Field(default=1.0, gt=0)
    retry_max_s: float = Field(default=30.0, gt=0)
    # Stage start/end calls (create a nested run, mark it finished) keep retrying a down server
    # this long; then a stage start fails with a clear error and a stage end only warns.
    boundary_retry_s: float = Field(default=60.0, ge=0)
    # The start-up reachability check of a remote server fails after this long.
    connect_timeout_s: float = Field(default=5.0, gt=0)
    # Exports to register in MLflow's model registry: export (teacher, student, finetune/<task>) ->
    # registered model name; each run that exports it adds a version.
    register_models: dict[str, str] = Field(default_factory=dict)

    @field_validator("uri")
    @classmethod
    def _check_uri(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError(f"tracking.uri: empty string {value!r}; leave it unset for the default store")
        if value is not None and (urlparse(value).username or urlparse(value).password):
            raise ValueError(f"tracking.uri {shown(value)!r} carries credentials, which the recipe would save, log "
                             "as a param and print: give a server's through MLFLOW_TRACKING_USERNAME / "
                             "MLFLOW_TRACKING_PASSWORD, a database URI through MLFLOW_TRACKING_URI in the environment")
        return value

    @field_validator("register_models")
    @classmethod
    def _check_register(cls, value: dict[str, str]) -> dict[str, str]:
        for export, name in value.items():
            if not EXPORT_NAME.fullmatch(export):
                raise ValueError(f"tracking.register_models: {export!r} is not an export; expected teacher, student or "
                                 "finetune/<task>")
            if not name.strip() or "/" in name or ":" in name:
                raise ValueError(f"tracking.register_models.{export}: {name!r} is not a registered model name "
                                 "(non-empty, without '/' or ':')")
        return value

    @field_validator("experiment")
    @classmethod
    def _check_experiment(cls, value: str) -> str:
        if not value.strip():
            raise ValueError(f"tracking.experiment: empty name {value!r}")
        return value


@dataclass(frozen=True)
class ResolvedStore:
    """A tracking URI plus where new experiments keep their artifacts (None: the server decides)."""

    uri: str
    artifact_location: str | None


def default_store_uri(layout: RunLayout) -> str:
    """The embedded SQLite store of a run directory (absolute, so it survives a chdir)."""
    return f"sqlite:///{layout.mlflow_db}"


def resolve_store(config: TrackingConfig, layout: RunLayout) -> ResolvedStore:
    """Pick the store: recipe `tracking.uri`, then `MLFLOW_TRACKING_URI`, then the run's `mlflow.db`.

    Local database stores get their artifacts in the run's `mlartifacts/`: MLflow would otherwise
    put them under `./mlruns` of whatever the current directory is. When the run directory lives on
    an object store, that folder is the stored one, a location every node can reach.
    """
    uri = config.uri or os.environ.get("MLFLOW_TRACKING_URI") or default_store_uri(layout)
    if is_local_database(uri):
        return ResolvedStore(uri=uri, artifact_location=layout.location_uri(layout.mlflow_artifacts))
    return ResolvedStore(uri=uri, artifact_location=None)


def shown(uri: str) -> str:
    """The URI as pofa prints it: a password (from MLFLOW_TRACKING_URI, say) replaced by ***."""
    parts = urlparse(uri)
    if not parts.password:
        return uri
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return parts._replace(netloc=netloc).geturl()


def is_local_database(uri: str) -> bool:
    return urlparse(uri).scheme == "sqlite"


def is_http(uri: str) -> bool:
    return urlparse(uri).scheme in ("http", "https")


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///...` URI; None for other stores or in-memory SQLite."""
    if not is_local_database(uri):
        return None
    path = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else ""
    if not path or path == ":memory:":
        return None
    # sqlite:////abs/path gives "/abs/path"; sqlite:///rel/path gives "rel/path".
    return Path(path)
