"""What a finished stage adds to MLflow for people who compare runs, read from its manifest alone.

- `stage_metrics`: the manifest's numeric statistics, less ids and timestamps (those are tags or params);
- `Export` / `run_export`: a model a stage (or a fine-tuning run) exported, with the metrics, params
  and step it is logged with.
A stage's own headline results and exports are the stage's to say (`Stage.headline_metrics`, `.exports`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from orchestrator.tracking.params import clean_key
from workers.run_layout import RunLayout
from workers.stage_outputs import FinetuneRunOutput

# Statistics that identify rather than measure: never metrics (plotted, they would be noise).
_NOT_MEASURED = ("fingerprint",)
_NOT_MEASURED_PREFIXES = ("runs.",)  # fine-tuning runs' timeline: start and end times, nodes
# A pretraining stage's validation results, the ones a run is compared by.
VALIDATION = ("val/loss", "val/mlm_acc", "val/nsp_acc")
# transformers pipeline task of each downstream task kind (pipelines.finetune.tasks.TaskSpec.kind)
_PIPELINE_TASK = {"classification": "text-classification", "qa": "question-answering"}


@dataclass(frozen=True)
class Export:
    """One exported model folder and what it is logged to MLflow with."""

    name: str  # teacher, student, finetune/<task>/<run>
    folder: str
    task: str  # the transformers pipeline task
    metrics: dict[str, float] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    step: int = 0  # the training step it is from: MLflow links the run's metrics at that step to it


def is_number(value: object) -> bool:
    if isinstance(value, bool):
        return False
    try:
        float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return True


def stage_metrics(stats: Mapping[str, Any]) -> dict[str, float]:
    """The numeric statistics of a stage, flattened (`results.polarity.accuracy`); ids and times left out."""
    return {clean_key(k): float(v) for k, v in _leaves(stats)
            if k not in _NOT_MEASURED and not k.startswith(_NOT_MEASURED_PREFIXES)
            and is_number(v) and not isinstance(v, str)}


def _leaves(tree: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        out += _leaves(value, name) if isinstance(value, Mapping) else [(name, value)]
    return out


def run_export(task: str, run: FinetuneRunOutput, layout: RunLayout) -> Export:
    """One fine-tuning run's own export (the task teacher, a seed), with its evaluation results."""
    from pipelines.finetune.tasks import get_task

    metrics = {k: float(v) for k, v in run.metrics.items()}
    if run.sparsity is not None:
        metrics["sparsity"] = float(run.sparsity)
    return Export(f"finetune/{task}/{run.name}", layout.path(run.model), _PIPELINE_TASK[get_task(task).kind],
                  metrics, {"task": task, "run": run.name, "seed": run.seed}, run.final_step)
