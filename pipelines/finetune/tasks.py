"""The downstream tasks of the model card: schema, splits and metrics of each, in one table.

Everything else in `pipelines.finetune` reads a task through its `TaskSpec`, so adding a task is one
entry here (plus its name in `config.TASK_NAMES`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

POLARITY_PATH = "pkg://gensim/test/test_data/pang_lee_polarity.cor"


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: Literal["classification", "qa"]
    hub: tuple[str, ...]  # `datasets.load_dataset` positional args; () = no hub dataset (polarity)
    text_columns: tuple[str, ...]  # one column, or a sentence pair; QA: (question, context)
    label_column: str  # QA: "answers" = {"text": [...], "answer_start": [...]}
    num_labels: int  # QA: 2 (start and end logits)
    train_split: str
    eval_splits: dict[str, str] = field(hash=False)  # metric prefix -> split name
    metrics: tuple[str, ...]  # metric keys produced, prefixes included
    primary_metric: str
    label_names: tuple[str, ...] = ()  # index = label id; for id2label and `__label__name` files
    default_path: Optional[str] = None  # labelled file used when the recipe names no source

    def metric_key(self, prefix: str, metric: str) -> str:
        return f"{prefix}_{metric}" if prefix else metric


def _glue(name: str, text_columns: tuple[str, ...], label_names: tuple[str, ...],
          metrics: tuple[str, ...] = ("accuracy",)) -> TaskSpec:
    return TaskSpec(name=name, kind="classification", hub=("glue", name), text_columns=text_columns,
                    label_column="label", num_labels=len(label_names), train_split="train",
                    eval_splits={"": "validation"}, metrics=metrics, primary_metric=metrics[0],
                    label_names=label_names)


TASKS: dict[str, TaskSpec] = {
    "squad": TaskSpec(name="squad", kind="qa", hub=("squad",), text_columns=("question", "context"),
                      label_column="answers", num_labels=2, train_split="train",
                      eval_splits={"": "validation"}, metrics=("exact_match", "f1"), primary_metric="f1"),
    "mnli": TaskSpec(name="mnli", kind="classification", hub=("glue", "mnli"),
                     text_columns=("premise", "hypothesis"), label_column="label", num_labels=3,
                     train_split="train",
                     eval_splits={"m": "validation_matched", "mm": "validation_mismatched"},
                     metrics=("m_accuracy", "mm_accuracy"), primary_metric="m_accuracy",
                     label_names=("entailment", "neutral", "contradiction")),
    "qqp": _glue("qqp", ("question1", "question2"), ("not_duplicate", "duplicate"), ("accuracy", "f1")),
    "qnli": _glue("qnli", ("question", "sentence"), ("entailment", "not_entailment")),
    "sst2": _glue("sst2", ("sentence",), ("negative", "positive")),
    # Offline stand-in for SST-2: real movie-review sentences (Pang & Lee) that gensim ships.
    "polarity": TaskSpec(name="polarity", kind="classification", hub=(), text_columns=("sentence",),
                         label_column="label", num_labels=2, train_split="train",
                         eval_splits={"": "validation"}, metrics=("accuracy",), primary_metric="accuracy",
                         label_names=("neg", "pos"), default_path=POLARITY_PATH),
}


def get_task(name: str) -> TaskSpec:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown fine-tuning task {name!r}; known tasks: {', '.join(TASKS)}") from None
