"""Talking to a tracking store: per-request limits and the start-up reachability check."""
from __future__ import annotations

import os
import threading
import urllib.error
import urllib.request
from pathlib import Path

from workers.run_layout import RunLayout
from orchestrator.tracking.config import TrackingConfig, is_http, resolve_store, shown, sqlite_path


class TrackingUnreachableError(ValueError):
    """The configured tracking store cannot be used; raised before any cluster work starts."""


def apply_request_settings(timeout_s: float, max_retries: int) -> None:
    """Bound each MLflow HTTP request of this process.

    MLflow reads these from the environment at every request, and its defaults (7 retries with
    exponential backoff) can hold one call for minutes. pofa retries on its own, with backoff,
    in a background thread, so it keeps each request short. Values the user exported win.
    """
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, round(timeout_s))))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(max_retries))


class TrackingMisconfigured(TrackingUnreachableError):
    """A wrong setting, not an outage (something that is not MLflow answers, a SQLite folder that
    cannot be written): waiting would not help, so the run stops before any work."""


def check_tracking(config: TrackingConfig, layout: RunLayout) -> str | None:
    """Preflight for the CLI (e.g. before `pofa submit`): the resolved URI, or None if disabled."""
    if not config.enabled:
        return None
    uri = resolve_store(config, layout).uri
    check_reachable(uri, config.connect_timeout_s)
    return uri


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, with a message that says what to do, when the tracking store cannot be used.

    HTTP(S) stores must answer MLflow's `/health` (or a REST call) within `timeout_s`; the whole
    check, name resolution included, runs under that deadline so an unroutable host cannot hang
    the caller. A SQLite store needs a directory it can create its database in.
    """
    if is_http(uri):
        _check_server(uri, timeout_s)
        return
    db = sqlite_path(uri)
    if db is not None:
        _check_database_dir(uri, db)


def _check_server(uri: str, timeout_s: float) -> None:
    outcome: list[BaseException | None] = []

    def probe() -> None:
        try:
            _probe_server(uri.rstrip("/"), timeout_s)
            outcome.append(None)
        except BaseException as exc:  # reported to the caller below
            outcome.append(exc)

    # urllib's timeout does not cover DNS resolution, so the probe runs under a hard deadline.
    thread = threading.Thread(target=probe, name="pofa-tracking-probe", daemon=True)
    thread.start()
    thread.join(timeout_s + 1.0)
    if not outcome:
        raise TrackingUnreachableError(_unreachable(uri, f"no answer within {timeout_s:g} s"))
    if outcome[0] is not None:
        exc = outcome[0]
        if isinstance(exc, TrackingUnreachableError):
            raise exc
        raise TrackingUnreachableError(_unreachable(uri, _reason(exc))) from exc


def _probe_server(base: str, timeout_s: float) -> None:
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=timeout_s) as response:
            if response.status == 200:
                return
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            return  # an MLflow server behind authentication: reachable, credentials come from env
        if exc.code != 404:
            raise
    # Something answered but has no /health (e.g. a proxy that maps only the API): ask the API.
    url = f"{base}/api/2.0/mlflow/experiments/search?max_results=1"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            if response.status == 200:
                return
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            return
        raise TrackingMisconfigured(
            f"tracking.uri {shown(base)!r} answers HTTP but does not look like an MLflow tracking server "
            f"(GET {url} gave HTTP {exc.code}); check the address and port"
        ) from exc


def _check_database_dir(uri: str, db: Path) -> None:
    folder = db.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TrackingMisconfigured(
            f"tracking.uri {shown(uri)!r}: cannot create the folder {str(folder)!r} for the SQLite store ({exc})"
        ) from exc
    if not os.access(folder, os.W_OK):
        raise TrackingMisconfigured(
            f"tracking.uri {shown(uri)!r}: the folder {str(folder)!r} for the SQLite store is not writable"
        )


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.URLError):
        return str(exc.reason)
    return f"{type(exc).__name__}: {exc}"


def _unreachable(uri: str, reason: str) -> str:
    return (
        f"MLflow tracking server {shown(uri)!r} is not reachable ({reason}). Start the server, fix "
        "tracking.uri in the recipe or the MLFLOW_TRACKING_URI environment variable, or unset "
        "both to record into the SQLite store inside the run directory."
    )
