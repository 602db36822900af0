"""Published Prune OFA transfer-learning results, per built-in model-card recipe (dev sets, percent).

Each value is the mean of two runs with the same hyperparameters and different seeds, as Intel states
under the table. A recipe's row lists exactly the tasks that recipe fine-tunes, so a report can put
a run's numbers next to the paper's without guessing which cells exist.
"""
from __future__ import annotations

SOURCE = (
    "Zafrir et al., 'Prune Once for All: Sparse Pre-Trained Language Models', arXiv:2111.05754 (2021), "
    "results table as reproduced in IntelLabs/Model-Compression-Research-Package "
    "research/prune-once-for-all/README.md ('Our Results'; mean of two seeds); the 80% 1x4 block row from the "
    "model card of Intel/bert-base-uncased-squadv1.1-sparse-80-1x4-block-pruneofa (EM 81.2867, F1 88.4735, "
    "rounded to 81.29/88.47 in its metrics table)."
)

# Metric keys per task: squad exact_match/f1; mnli m_accuracy/mm_accuracy; qqp accuracy/f1;
# qnli accuracy; sst2 accuracy.
# The model card's table, column by column (None: the card has no figure there).
_COLUMNS = (("squad", "exact_match"), ("squad", "f1"), ("mnli", "m_accuracy"), ("mnli", "mm_accuracy"),
            ("qqp", "accuracy"), ("qqp", "f1"), ("qnli", "accuracy"), ("sst2", "accuracy"))
_ROWS: dict[str, tuple[float | None, ...]] = {
    "bert-base-uncased-sparse-80-1x4-block-pruneofa": (81.29, 88.47, None, None, None, None, None, None),
    "bert-base-uncased-sparse-85-unstructured-pruneofa": (81.10, 88.42, 82.71, 83.67, 91.15, 88.00, 90.34, 91.46),
    "bert-base-uncased-sparse-90-unstructured-pruneofa": (79.83, 87.25, 81.45, 82.43, 90.93, 87.72, 89.07, 90.88),
    "bert-large-uncased-sparse-90-unstructured-pruneofa": (83.35, 90.20, 83.74, 84.20, 91.48, 88.43, 91.39, 92.95),
    "distilbert-base-uncased-sparse-85-unstructured-pruneofa": (78.10, 85.82, 81.35, 82.03, 90.29, 86.97, 88.31,
                                                                 90.60),
    "distilbert-base-uncased-sparse-90-unstructured-pruneofa": (76.91, 84.82, 80.68, 81.47, 90.05, 86.67, 87.66,
                                                                 90.02),
}


def _by_task(row: tuple[float | None, ...]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for (task, metric), value in zip(_COLUMNS, row):
        if value is not None:
            out.setdefault(task, {})[metric] = value
    return out


PUBLISHED: dict[str, dict[str, dict[str, float]]] = {name: _by_task(row) for name, row in _ROWS.items()}
