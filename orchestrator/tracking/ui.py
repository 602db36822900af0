"""What to tell the user at the end of a run so they can open it in MLflow."""
from __future__ import annotations

import shlex

from orchestrator.tracking.config import is_http, shown, sqlite_path


def mlflow_ui_command(tracking_uri: str) -> str | None:
    """`mlflow ui --backend-store-uri sqlite:///<abs path>/mlflow.db` for a local store.

    None for a tracking server, which already has a web UI (see `run_url`).
    """
    db = sqlite_path(tracking_uri)
    if db is None:
        return None
    uri = f"sqlite:///{db.resolve()}"
    return f"mlflow ui --backend-store-uri {shlex.quote(uri)}"


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str | None:
    """The page of a run on a tracking server; None for local stores."""
    if not is_http(tracking_uri):
        return None
    return f"{shown(tracking_uri).rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def how_to_view(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """One line for the console: the exact command or URL that shows the run."""
    command = mlflow_ui_command(tracking_uri)
    if command:
        return f"MLflow: {command}   (then open http://127.0.0.1:5000, run {run_id})"
    url = run_url(tracking_uri, experiment_id, run_id)
    if url:
        return f"MLflow: {url}"
    return f"MLflow: tracking URI {shown(tracking_uri)}, experiment {experiment_id}, run {run_id}"
