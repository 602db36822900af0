"""Rank-0 progress lines (into the worker's log) and the end-of-stage summary."""
from __future__ import annotations

import time
from typing import Mapping, Sequence

from workers.run_records import TrainSummary


class Progress:
    """Rank 0 writes a plain progress line to its log every 5% of the stage (the console's live line
    is drawn by the driver from the metrics the workers log); a no-op on other ranks or when disabled."""

    def __init__(self, stage: str, total: int, initial: int, enabled: bool) -> None:
        self._stage, self._total, self._step, self._enabled = stage, max(total, 1), initial, enabled
        self._every = max(1, self._total // 20)
        self._began, self._first = time.monotonic(), initial

    def update(self, metrics: Mapping[str, float]) -> None:
        self._step += 1
        if not self._enabled or (self._step % self._every and self._step != self._total):
            return
        rate = (self._step - self._first) / max(time.monotonic() - self._began, 1e-9)
        print(f"[{self._stage}] step {self._step}/{self._total} loss={metrics.get('loss', float('nan')):.4f} "
              f"samples/s={metrics.get('throughput/samples_per_s', 0.0):.1f} steps/s={rate:.2f}", flush=True)

    def close(self) -> None:
        return None


def format_summary(summary: TrainSummary, start_steps: Sequence[int], elapsed_s: float) -> str:
    """One screen: what ran, from where, how it ended, where the model is. `start_steps` and
    `elapsed_s` cover every attempt, which the summary (of the last one) does not."""
    m = summary.metrics
    lines = [
        f"== {summary.stage} finished: step {summary.final_step} of {summary.max_steps}"
        f" (attempts started at steps {list(start_steps)}) in {elapsed_s:.1f}s",
        f"   workers {summary.world_size}  global batch {summary.global_batch_size}"
        f"  ZeRO {summary.zero_stage}  {summary.precision}",
    ]
    keys = ["loss", "loss/hard", "loss/kd", "val/loss", "val/mlm_acc", "val/nsp_acc", "sparsity/global",
            "throughput/samples_per_s"]
    shown = [f"{k}={m[k]:.4f}" for k in keys if k in m]
    if shown:
        lines.append("   " + "  ".join(shown))
    lines.append(f"   model: {summary.model_dir}")
    if summary.checkpoint:
        lines.append(f"   last checkpoint: {summary.checkpoint}")
    return "\n".join(lines)
