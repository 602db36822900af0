"""Rank-0 console output: a progress bar (step, loss, throughput, ETA) and the end-of-stage summary."""
from __future__ import annotations

from typing import Any, Mapping, Optional


class Progress:
    """A tqdm bar that Ray forwards to the driver console; a no-op on other ranks or when disabled."""

    def __init__(self, stage: str, total: int, initial: int, enabled: bool) -> None:
        self._bar: Optional[Any] = None
        self._stage = stage
        if not enabled:
            return
        try:  # renders cleanly on the driver when running inside Ray workers
            from ray.experimental.tqdm_ray import tqdm
        except ImportError:  # pragma: no cover - ray always ships it today
            from tqdm import tqdm
        self._bar = tqdm(total=total, desc=f"{stage}", unit="step")
        if initial:
            self._bar.update(initial)  # a resumed stage starts part-way

    def update(self, metrics: Mapping[str, float]) -> None:
        if self._bar is None:
            return
        # ray's tqdm has no postfix: loss and throughput go in the description (ETA comes from tqdm)
        self._bar.set_description(f"{self._stage} loss={metrics.get('loss', float('nan')):.4f} "
                                  f"samples/s={metrics.get('throughput/samples_per_s', 0.0):.1f}")
        self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def format_summary(summary: Mapping[str, Any]) -> str:
    """One screen: what ran, from where, how it ended, where the model is."""
    m = summary.get("metrics", {})
    lines = [
        f"== {summary['stage']} finished: step {summary['final_step']} of {summary['max_steps']}"
        f" (attempts started at steps {summary.get('start_steps', [])}) in {summary.get('elapsed_s', 0):.1f}s",
        f"   workers {summary.get('world_size')}  global batch {summary.get('global_batch_size')}"
        f"  ZeRO {summary.get('zero_stage')}  {summary.get('precision')}",
    ]
    keys = ["loss", "loss/hard", "loss/kd", "val/loss", "val/mlm_acc", "val/nsp_acc", "sparsity/global",
            "throughput/samples_per_s"]
    shown = [f"{k}={m[k]:.4f}" for k in keys if k in m]
    if shown:
        lines.append("   " + "  ".join(shown))
    lines.append(f"   model: {summary.get('model_dir')}")
    if summary.get("checkpoint"):
        lines.append(f"   last checkpoint: {summary['checkpoint']}")
    return "\n".join(lines)
