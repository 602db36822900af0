"""The small interface the training loop logs to.

`workers/` never imports MLflow or `orchestrator`: the orchestrator implements this protocol
(with MLflow) and injects an instance into the loop config. Implementations must be picklable,
because Ray ships them to the worker processes; only rank 0 calls them.
"""
from __future__ import annotations

from typing import Mapping, Protocol, runtime_checkable


@runtime_checkable
class Tracker(Protocol):
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Record metrics at a training step. Must never block on the network."""

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        """Record a file or folder produced by the stage."""

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Record run tags (e.g. restart counts)."""

    def flush(self) -> None:
        """Deliver buffered records; called at checkpoints and at the end of a stage."""


class NullTracker:
    """Tracks nothing: the default when no tracker is injected, and for ranks other than 0."""

    def log_metrics(self, metrics: Mapping[str, float], step: int, timestamp_ms: int | None = None) -> None:
        pass

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: Mapping[str, str]) -> None:
        pass

    def flush(self) -> None:
        pass
