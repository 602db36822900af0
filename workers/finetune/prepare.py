"""Driver side of a task: load and validate its examples, tokenize them into features, write them
to the task's data folder once (shared by the teacher and every seed). Bad data fails here, before
any worker starts."""
from __future__ import annotations

import json
import os
from typing import Any

import pyarrow.parquet as pq
from transformers import AutoConfig, AutoTokenizer

from pipelines.atomic import atomic_dir, write_json_atomic
from pipelines.finetune.config import TaskConfig
from pipelines.finetune.data import load_task_splits
from pipelines.finetune.encode import encode_classification, encode_qa
from pipelines.finetune.tasks import TaskSpec, get_task
from workers.run_layout import TaskDataLayout


def _check_model(task: TaskConfig, init_model: str) -> None:
    try:
        config = AutoConfig.from_pretrained(init_model)
    except (OSError, ValueError) as exc:
        raise ValueError(f"finetune: cannot load the model to fine-tune {init_model!r} ({exc})") from exc
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and task.max_seq_length > limit:
        raise ValueError(f"finetune.tasks[{task.name}].max_seq_length={task.max_seq_length} exceeds the model's "
                         f"max_position_embeddings={limit} ({init_model})")


def _encode(spec: TaskSpec, task: TaskConfig, ds: Any, tokenizer: Any, train: bool) -> tuple[Any, dict[str, int]]:
    if spec.kind == "qa":
        return encode_qa(ds, tokenizer, task.max_seq_length, task.doc_stride, task.max_query_length, train=train)
    return encode_classification(ds, spec, tokenizer, task.max_seq_length)


def prepare_task(task: TaskConfig, init_model: str, data: TaskDataLayout) -> dict[str, Any]:
    """Write the task's data folder (atomically, as a whole) unless it holds this task config already;
    returns its stats."""
    key = task.model_dump(mode="json")
    if os.path.exists(data.prepared):
        with open(data.prepared) as f:
            prepared = json.load(f)
        if prepared.get("task") == key:
            return prepared["stats"]
    spec = get_task(task.name)
    _check_model(task, init_model)
    splits, load_stats = load_task_splits(spec, task.data)
    tokenizer = AutoTokenizer.from_pretrained(init_model)
    stats: dict[str, Any] = {"load": load_stats}
    with atomic_dir(data.root) as tmp:
        staged = TaskDataLayout(tmp)
        for split, ds in splits.items():
            table, enc_stats = _encode(spec, task, ds, tokenizer, train=split == spec.train_split)
            # row groups of 4096: each worker reads only the groups holding its share of the features
            pq.write_table(table, staged.features(split), row_group_size=4096)
            stats[split] = enc_stats
            if spec.kind == "qa" and split != spec.train_split:
                with open(staged.examples(split), "w") as f:
                    for ex in ds:
                        f.write(json.dumps({"id": ex["id"], "context": ex["context"], "answers": ex["answers"]}) + "\n")
        tokenizer.save_pretrained(staged.tokenizer)
        write_json_atomic({"task": key, "stats": stats}, staged.prepared)
    return stats
