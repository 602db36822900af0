"""MLflow tracking for pofa: the recipe's `tracking` section, one parent run per pipeline run and a
nested run per stage (resumable from `<run_dir>/tracking.json`), and a non-blocking, picklable
tracker that the training loop logs to through `workers.tracking.Tracker`.

MLflow itself is imported lazily, so importing this package stays cheap for the CLI.
"""
from orchestrator.tracking.config import TrackingConfig, default_store_uri, resolve_store
from orchestrator.tracking.connection import TrackingUnreachableError, check_reachable, check_tracking
from orchestrator.tracking.models import log_hf_model
from orchestrator.tracking.params import flatten_params
from orchestrator.tracking.session import TrackingSession
from orchestrator.tracking.tags import default_tags
from orchestrator.tracking.tracker import AsyncMlflowTracker, SenderSettings
from orchestrator.tracking.ui import how_to_view, mlflow_ui_command

__all__ = [
    "AsyncMlflowTracker",
    "SenderSettings",
    "TrackingConfig",
    "TrackingSession",
    "TrackingUnreachableError",
    "check_reachable",
    "check_tracking",
    "default_store_uri",
    "default_tags",
    "flatten_params",
    "how_to_view",
    "log_hf_model",
    "mlflow_ui_command",
    "resolve_store",
]
