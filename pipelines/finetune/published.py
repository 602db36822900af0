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
PUBLISHED: dict[str, dict[str, dict[str, float]]] = {
    "bert-base-uncased-sparse-80-1x4-block-pruneofa": {
        "squad": {"exact_match": 81.29, "f1": 88.47},
    },
    "bert-base-uncased-sparse-85-unstructured-pruneofa": {
        "squad": {"exact_match": 81.10, "f1": 88.42},
        "mnli": {"m_accuracy": 82.71, "mm_accuracy": 83.67},
        "qqp": {"accuracy": 91.15, "f1": 88.00},
        "qnli": {"accuracy": 90.34},
        "sst2": {"accuracy": 91.46},
    },
    "bert-base-uncased-sparse-90-unstructured-pruneofa": {
        "squad": {"exact_match": 79.83, "f1": 87.25},
        "mnli": {"m_accuracy": 81.45, "mm_accuracy": 82.43},
        "qqp": {"accuracy": 90.93, "f1": 87.72},
        "qnli": {"accuracy": 89.07},
        "sst2": {"accuracy": 90.88},
    },
    "bert-large-uncased-sparse-90-unstructured-pruneofa": {
        "squad": {"exact_match": 83.35, "f1": 90.20},
        "mnli": {"m_accuracy": 83.74, "mm_accuracy": 84.20},
        "qqp": {"accuracy": 91.48, "f1": 88.43},
        "qnli": {"accuracy": 91.39},
        "sst2": {"accuracy": 92.95},
    },
    "distilbert-base-uncased-sparse-85-unstructured-pruneofa": {
        "squad": {"exact_match": 78.10, "f1": 85.82},
        "mnli": {"m_accuracy": 81.35, "mm_accuracy": 82.03},
        "qqp": {"accuracy": 90.29, "f1": 86.97},
        "qnli": {"accuracy": 88.31},
        "sst2": {"accuracy": 90.60},
    },
    "distilbert-base-uncased-sparse-90-unstructured-pruneofa": {
        "squad": {"exact_match": 76.91, "f1": 84.82},
        "mnli": {"m_accuracy": 80.68, "mm_accuracy": 81.47},
        "qqp": {"accuracy": 90.05, "f1": 86.67},
        "qnli": {"accuracy": 87.66},
        "sst2": {"accuracy": 90.02},
    },
}
