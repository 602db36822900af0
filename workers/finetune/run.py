"""Driver side of one fine-tuning run: checks before any worker starts, then the Ray Train job."""
from __future__ import annotations

import os

from transformers import AutoConfig

from pipelines.finetune.tasks import get_task
from workers import native_ops
from workers.finetune.finetune_worker import finetune_loop
from workers.finetune.spec import FinetuneSpec
from workers.train.inputs import saved_vocab
from workers.train.preflight import check_checkpoint_world, check_resources
from workers.train.spec import TrainResult
from workers.train.driver import run_training


def _check_same_vocab(spec: FinetuneSpec) -> None:
    """The task's features were tokenized for the sparse model: a local teacher or model folder with
    another vocabulary would read them as different words (hub models are checked by their loader)."""
    ours = saved_vocab(spec.data.tokenizer)
    for what, folder in (("model", spec.init_model), ("teacher", spec.teacher_dir)):
        if folder and os.path.isdir(folder):
            theirs = saved_vocab(folder)
            if ours is not None and theirs is not None and theirs != ours:
                raise ValueError(f"finetune/{spec.task.name}: the {what} {folder!r} has another vocabulary than the "
                                 f"features in {spec.data.root} (tokenized for the sparse model)")


def finetune_preflight(spec: FinetuneSpec) -> None:
    task = get_task(spec.task.name)
    for split in (task.train_split, *task.eval_splits.values()):
        if not os.path.isfile(spec.data.features(split)):
            raise ValueError(f"finetune/{task.name}: features for split {split!r} are missing in {spec.data.root}")
    teacher = spec.teacher_dir
    if teacher is not None and (os.path.isabs(teacher) or teacher.startswith(".")) and not os.path.isdir(teacher):
        raise ValueError(f"finetune/{task.name}: the task teacher {teacher!r} does not exist")
    _check_same_vocab(spec)
    if teacher is not None and task.kind == "classification":
        try:
            labels = AutoConfig.from_pretrained(teacher).num_labels
        except (OSError, ValueError) as exc:
            raise ValueError(f"finetune/{task.name}: cannot load the task teacher {teacher!r} ({exc})") from exc
        if labels != task.num_labels:
            raise ValueError(f"finetune/{task.name}: the task teacher {teacher!r} has {labels} labels, the task "
                             f"{task.num_labels}: use a teacher fine-tuned on {task.name}")
    check_checkpoint_world(spec)
    native_ops.check_cache()
    check_resources(spec)


def run_finetune(spec: FinetuneSpec, *, echo: bool = True) -> TrainResult:
    """Run (or resume from its last checkpoint) one task run to completion; exports its model."""
    return run_training(spec, echo=echo, loop=finetune_loop, check=finetune_preflight)
