"""Downstream scores, in percent like the model card: GLUE accuracy (and QQP F1) and SQuAD EM/F1.

The arithmetic is torchmetrics' (its SQuAD metric is the official v1.1 script), so the numbers are
comparable with published ones; nothing is downloaded at evaluation time.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torchmetrics.functional.classification import binary_f1_score, multiclass_accuracy
from torchmetrics.functional.text import squad

from pipelines.finetune.tasks import TaskSpec


def classification_metrics(task: TaskSpec, predictions: dict[str, np.ndarray],
                           labels: dict[str, np.ndarray]) -> dict[str, float]:
    """Per eval split prefix ("" / "m" / "mm"): predicted class ids (or logits, argmaxed) vs gold labels."""
    prefixes = sorted(task.eval_splits)
    for name, given in (("predictions", predictions), ("labels", labels)):
        if sorted(given) != prefixes:
            raise ValueError(f"task {task.name}: {name} keyed by {sorted(given)}, expected eval prefixes {prefixes}")
    out: dict[str, float] = {}
    for prefix in prefixes:
        pred = _class_ids(task, prefix, predictions[prefix])
        gold = torch.as_tensor(np.asarray(labels[prefix]), dtype=torch.long)
        if pred.shape != gold.shape or gold.ndim != 1 or not len(gold):
            raise ValueError(f"task {task.name}: split {task.eval_splits[prefix]!r}: {tuple(pred.shape)} predictions "
                             f"for {tuple(gold.shape)} labels")
        if gold.min() < 0 or gold.max() >= task.num_labels:
            raise ValueError(f"task {task.name}: split {task.eval_splits[prefix]!r}: label {int(gold.max())} "
                             f"outside [0, {task.num_labels})")
        # average="micro": plain accuracy (the default, "macro", averages per-class recall).
        acc = multiclass_accuracy(pred, gold, num_classes=task.num_labels, average="micro")
        out[task.metric_key(prefix, "accuracy")] = 100.0 * float(acc)
        if "f1" in task.metrics:  # QQP: F1 of the positive class ("duplicate")
            out[task.metric_key(prefix, "f1")] = 100.0 * float(binary_f1_score(pred, gold))
    return out


def _class_ids(task: TaskSpec, prefix: str, pred: np.ndarray) -> torch.Tensor:
    arr = np.asarray(pred)
    if arr.ndim == 2:
        if arr.shape[1] != task.num_labels:
            raise ValueError(f"task {task.name}: split {task.eval_splits[prefix]!r}: logits have {arr.shape[1]} "
                             f"classes, the task {task.num_labels}")
        arr = arr.argmax(axis=1)
    return torch.as_tensor(arr, dtype=torch.long)


def squad_metrics(predictions: dict[str, str], examples: Sequence[dict]) -> dict[str, float]:
    """{"exact_match", "f1"} in percent, each the max over an example's gold answers, averaged."""
    missing = [str(e["id"]) for e in examples if str(e["id"]) not in predictions]
    if missing:
        raise ValueError(f"squad_metrics: no prediction for {len(missing)} example(s), e.g. id {missing[0]!r}")
    if not examples:
        raise ValueError("squad_metrics: no examples")
    preds = [{"id": str(e["id"]), "prediction_text": predictions[str(e["id"])]} for e in examples]
    target = [{"id": str(e["id"]), "answers": {"text": list(e["answers"]["text"]),
                                                "answer_start": list(e["answers"]["answer_start"])}}
              for e in examples]
    scores = squad(preds, target)
    return {"exact_match": float(scores["exact_match"]), "f1": float(scores["f1"])}


def majority_baseline(labels: np.ndarray | Sequence[int]) -> float:
    """Accuracy (percent) of always predicting the most frequent label: the floor a model must beat."""
    arr = np.asarray(labels).ravel()
    if not arr.size:
        raise ValueError("majority_baseline: no labels")
    return 100.0 * float(np.bincount(arr.astype(np.int64)).max()) / arr.size
