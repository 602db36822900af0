"""GLUE metrics on hand-made arrays with known values, and the task table's consistency."""
from __future__ import annotations

import numpy as np
import pytest

from pipelines.finetune.config import TASK_NAMES
from pipelines.finetune.metrics import classification_metrics, majority_baseline
from pipelines.finetune.tasks import TASKS, get_task


def test_accuracy_in_percent_not_class_averaged():
    task = get_task("sst2")
    # 3 of 4 right; the per-class ("macro") average would be 50.
    out = classification_metrics(task, {"": np.array([0, 0, 0, 0])}, {"": np.array([0, 0, 0, 1])})
    assert out == {"accuracy": pytest.approx(75.0)}


def test_qqp_f1_is_on_the_duplicate_class():
    task = get_task("qqp")
    pred, gold = np.array([1, 1, 0, 0, 1]), np.array([1, 0, 0, 1, 1])
    out = classification_metrics(task, {"": pred}, {"": gold})
    # positive class: TP=2, FP=1, FN=1 -> F1 = 4/6; the negative class would give 1/2.
    assert out["accuracy"] == pytest.approx(60.0)
    assert out["f1"] == pytest.approx(100 * 4 / 6)


def test_mnli_matched_and_mismatched_from_logits():
    task = get_task("mnli")
    logits_m = np.array([[3.0, 0, 0], [0, 2.0, 0], [0, 0, 1.0], [1.0, 0, 0]])  # argmax 0 1 2 0
    preds = {"m": logits_m, "mm": np.array([2, 2])}
    out = classification_metrics(task, preds, {"m": np.array([0, 1, 2, 2]), "mm": np.array([2, 1])})
    assert out == {"m_accuracy": pytest.approx(75.0), "mm_accuracy": pytest.approx(50.0)}


def test_bad_inputs_name_the_problem():
    task = get_task("mnli")
    with pytest.raises(ValueError, match=r"\['m'\].*\['m', 'mm'\]"):
        classification_metrics(task, {"m": np.array([0])}, {"m": np.array([0]), "mm": np.array([0])})
    with pytest.raises(ValueError, match="validation_mismatched"):
        classification_metrics(task, {"m": np.array([0]), "mm": np.array([0, 1])},
                               {"m": np.array([0]), "mm": np.array([0])})
    with pytest.raises(ValueError, match="label 3"):
        classification_metrics(get_task("mnli"), {"m": np.array([0]), "mm": np.array([0])},
                               {"m": np.array([3]), "mm": np.array([0])})


@pytest.mark.parametrize("name", [n for n, t in TASKS.items() if t.kind == "classification"])
def test_every_classification_task_produces_exactly_its_declared_metrics(name):
    task = get_task(name)
    arrays = {p: np.arange(6) % task.num_labels for p in task.eval_splits}
    out = classification_metrics(task, arrays, arrays)
    assert set(out) == set(task.metrics) and task.primary_metric in out
    assert all(v == pytest.approx(100.0) for v in out.values())


def test_task_table_matches_the_recipe_names_and_rejects_unknown_tasks():
    assert tuple(TASKS) == TASK_NAMES
    assert all(t.num_labels == len(t.label_names) for t in TASKS.values() if t.kind == "classification")
    with pytest.raises(ValueError, match="cola.*squad, mnli"):
        get_task("cola")


def test_majority_baseline():
    assert majority_baseline(np.array([0, 1, 1, 1])) == pytest.approx(75.0)
    assert majority_baseline([2, 2, 0]) == pytest.approx(100 * 2 / 3)
