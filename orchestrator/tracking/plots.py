"""Loss and sparsity-schedule PNGs from a stage run's metric history in MLflow."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # no display on cluster nodes or CI
import matplotlib.pyplot as plt  # noqa: E402

LOSS_KEYS = ("loss", "loss/hard", "loss/kd", "val/loss")
SPARSITY_GLOBAL = "sparsity/global"
# Schedule-level series drawn bold; every other `sparsity/<layer>` is a faint per-layer line.
SPARSITY_MAIN = (SPARSITY_GLOBAL, "sparsity/target")
SPARSITY_PREFIX = "sparsity/"

Series = Sequence[tuple[int, float]]


def plot_series(series: Mapping[str, Series], path: str | os.PathLike[str], *, title: str,
                ylabel: str, thin: Sequence[str] = ()) -> Path:
    """Write one line chart (x = training step); keys in `thin` are faint grey "per layer" lines."""
    if not series:
        raise ValueError(f"plot {title!r}: no metric series to draw")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    try:
        thin_labelled = False
        for name, points in series.items():
            steps = [step for step, _ in points]
            values = [value for _, value in points]
            if name in thin:
                label = None if thin_labelled else f"per layer ({len(thin)})"
                thin_labelled = True
                ax.plot(steps, values, linewidth=0.7, alpha=0.35, color="tab:gray", label=label)
            else:
                ax.plot(steps, values, linewidth=1.8, label=name)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(loc="best")
        fig.tight_layout()
        fig.savefig(out)
    finally:
        plt.close(fig)
    return out


def history(client: Any, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) pairs of one metric, by step; the last value wins where a step repeats."""
    by_step = {}
    for metric in sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp)):
        by_step[metric.step] = metric.value
    return sorted(by_step.items())


def stage_plots(client: Any, run_id: str, out_dir: str | os.PathLike[str]) -> list[Path]:
    """`loss.png` and `sparsity.png` for the metrics a stage run has; the files written."""
    keys = set(client.get_run(run_id).data.metrics)
    written = []
    losses = {k: history(client, run_id, k) for k in LOSS_KEYS if k in keys}
    if losses:
        written.append(plot_series(losses, Path(out_dir) / "loss.png", title="Loss", ylabel="loss"))
    sparsity_keys = sorted(k for k in keys if k.startswith(SPARSITY_PREFIX))
    if sparsity_keys:
        series = {k: history(client, run_id, k) for k in sparsity_keys}
        per_layer = [k for k in sparsity_keys if k not in SPARSITY_MAIN]
        # The global schedule is what everyone looks at; layers are drawn faintly behind it.
        thin = per_layer if len(per_layer) < len(sparsity_keys) else ()
        written.append(plot_series(series, Path(out_dir) / "sparsity.png", title="Sparsity schedule",
                                   ylabel="fraction of zero weights", thin=thin))
    return written
