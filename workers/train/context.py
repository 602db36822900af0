"""Per-worker helpers: rank info, collectives, and tracking that never stops training."""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Mapping

import torch
import torch.distributed as dist

logger = logging.getLogger("pofa.train")


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_from_rank0(value: Any) -> Any:
    """A small Python value decided by rank 0, seen by all (keeps every rank on the same path)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: Any) -> list[Any]:
    """Every rank's (small, picklable) value, in rank order."""
    if not dist.is_initialized():
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


# Ids kept in metrics.jsonl (a run's record; tests compare them across worker counts) but not sent to the
# tracker: plotted as a metric, a digest is a meaningless curve.
RECORD_ONLY = frozenset({"data/batch"})


class SafeTracker:
    """Rank 0 logs to the injected tracker and to a local JSONL file; a tracking error is a warning."""

    def __init__(self, tracker: Any, metrics_path: str, enabled: bool) -> None:
        self.tracker = tracker
        self.metrics_path = metrics_path
        self.enabled = enabled
        self._warned = False

    def _guard(self, fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except Exception as exc:  # tracking must never stop training
            if not self._warned:
                logger.warning("tracking failed (%s: %s); training continues", type(exc).__name__, exc)
                self._warned = True

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        if not self.enabled:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
        measured = {k: v for k, v in metrics.items() if k not in RECORD_ONLY}
        self._guard(self.tracker.log_metrics, measured, step)

    def tags(self, tags: Mapping[str, str]) -> None:
        if self.enabled:
            self._guard(self.tracker.set_tags, dict(tags))

    def artifact(self, path: str, artifact_path: str | None = None) -> None:
        if self.enabled and os.path.exists(path):
            self._guard(self.tracker.log_artifact, path, artifact_path)

    def flush(self) -> None:
        if self.enabled:
            self._guard(self.tracker.flush)
