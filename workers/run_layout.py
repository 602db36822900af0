"""Every path of a run directory, in one place.

    <run>/
      recipe.yaml  .lock  tracking.json  mlflow.db  mlartifacts/  logs/
      <stage>/manifest.json  <stage>/attempt.json
      preprocess/{train,validation}/shard-*.parquet  preprocess/tokenizer/  preprocess/.shards/<id>.json
      teacher/ student/                      a training run (TrainRunLayout)
      finetune/<task>/data/                  the task's prepared features
      finetune/<task>/{teacher,seed-<s>}/    a training run each (TrainRunLayout), plus result.json
      finetune/<task>/model/                 the first seed's export
      report/README.md  report/inference.json

No other code joins run-directory paths: the orchestrator and the workers receive a `RunLayout`
(picklable) and ask it. Every path it hands out is checked to lie inside the run directory, with
symlinks resolved; the same check serves the store, which is addressed by paths relative to the root.
Each JSON file's model sits beside its path (`# model: ...`, in workers/run_records.py unless named
otherwise): it is read and written only through that model.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

from pipelines.atomic import file_sha256
from workers.storage import RunStore, StorageError, except_checkpoints

STAGE_NAMES = ("preprocess", "teacher", "student", "finetune", "report")
SPLITS = ("train", "validation")


class LayoutError(ValueError):
    """A path that would lie outside the run directory, or a name that is not a plain folder name."""


def _plain(name: str, what: str) -> str:
    if not name or name in (".", "..") or "/" in name or os.sep in name:
        raise LayoutError(f"{what} {name!r} is not a plain folder name")
    return name


class _At:
    """A fixed path under a layout's root, declared once: `model = _At("model")`."""

    def __init__(self, *parts: str) -> None:
        self.parts = parts

    def __get__(self, obj: object, owner: type) -> str:
        return obj.path(*self.parts)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class TrainRunLayout:
    """One training run's folder: the teacher or student stage, or one fine-tuning run."""

    root: str
    name: str  # how logs and Ray Train name it: teacher, student, finetune/<task>/seed-<s>

    checkpoints = _At("checkpoints")
    model = _At("model")
    metrics = _At("metrics.jsonl")
    summary = _At("train_summary.json")  # model: TrainSummary
    attempts = _At("attempts.jsonl")  # model: AttemptRecord, one per line
    result = _At("result.json")  # model: stage_outputs.FinetuneRunOutput; a finished fine-tuning run (skipped on resume)
    ray_storage = _At("ray")

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    @property
    def ray_run_name(self) -> str:
        return "pofa-" + self.name.replace("/", "-")

    @property
    def stage(self) -> str:
        """The stage this run belongs to (what a user redoes when one of its files is bad)."""
        return self.name.split("/", 1)[0]

    def checkpoint_step(self, step: int) -> str:
        """A checkpoint's folder; its commit is MANIFEST.json inside (model: CheckpointManifest)."""
        return self.path("checkpoints", f"step-{step:08d}")


@dataclass(frozen=True)
class TaskDataLayout:
    """A fine-tuning task's prepared data (written once, read by its teacher and every seed)."""

    root: str

    tokenizer = _At("tokenizer")
    prepared = _At("prepared.json")  # its presence (with the task config inside) means the folder is complete

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def features(self, split: str) -> str:
        return self.path(f"{_plain(split, 'split')}.parquet")

    def examples(self, split: str) -> str:
        """QA evaluation examples (context and answers), one JSON object per line."""
        return self.path(f"{_plain(split, 'split')}.examples.jsonl")


@dataclass(frozen=True)
class RunLayout:
    """The run directory: where it lives (`store`) and every path in it (this node's copy)."""

    store: RunStore

    recipe = _At("recipe.yaml")
    lock = _At(".lock")
    tracking_registry = _At("tracking.json")
    mlflow_db = _At("mlflow.db")
    mlflow_artifacts = _At("mlartifacts")
    logs = _At("logs")
    ray_instance = _At(".ray-instance.json")  # the local Ray instance a run started (orchestrator/ray_leftovers.py)
    tokenizer = _At("preprocess", "tokenizer")
    report = _At("report", "README.md")
    inference_report = _At("report", "inference.json")  # CPU speed and sizes of every export (report stage)

    @classmethod
    def open(cls, path_or_uri: str, mirror_root: Optional[str] = None) -> "RunLayout":
        store = RunStore.open(path_or_uri, mirror_root)
        real = os.path.realpath(store.local)  # one notion of "inside": symlinks resolved once, here
        return cls(RunStore(store.uri if store.remote else real, real))

    # -- the root and the inside check ----------------------------------------------------------
    @property
    def root(self) -> str:
        return self.store.local

    @property
    def where(self) -> str:
        """Printable location: the URI without credentials, or the local path."""
        return self.store.display

    def path(self, *parts: str) -> str:
        """A path inside the run directory; anything that resolves outside it is refused."""
        target = os.path.normpath(os.path.join(self.root, *parts))
        real = os.path.realpath(target)
        if real != self.root and not real.startswith(self.root + os.sep):
            raise LayoutError(f"{os.path.join(*parts) if parts else '.'!r} resolves to {real}, outside the run "
                              f"directory {self.root}")
        return target

    def rel(self, path: str) -> str:
        """`path` relative to the root (POSIX separators, "" for the root); refused when outside."""
        real = os.path.realpath(path)
        if real == self.root:
            return ""
        if not real.startswith(self.root + os.sep):
            raise LayoutError(f"{path} lies outside the run directory {self.root}")
        return os.path.relpath(real, self.root).replace(os.sep, "/")

    def location_uri(self, path: str) -> str:
        """Where `path` durably lives, as a URI other processes can reach: the store's (no credentials)
        or a file:// URI."""
        return self.store.where(self.rel(path)) if self.store.remote else Path(path).as_uri()

    def contains(self, path: str) -> bool:
        try:
            self.rel(path)
        except LayoutError:
            return False
        return True

    # -- stages ---------------------------------------------------------------------------------
    def stage_dir(self, stage: str) -> str:
        return self.path(_plain(stage, "stage"))

    def stage_rel(self, stage: str, path: str) -> str:
        """`path` relative to the stage's folder (how a manifest names its outputs)."""
        rel = self.rel(path)
        prefix = self.rel(self.stage_dir(stage)) + "/"
        if not rel.startswith(prefix):
            raise LayoutError(f"{path} is not inside the {stage} stage's folder")
        return rel[len(prefix):]

    def file_hashes(self, stage: str, folder: str) -> dict[str, str]:
        """Every file directly in `folder` -> sha256, keyed relative to the stage's folder."""
        return {self.stage_rel(stage, os.path.join(folder, name)): file_sha256(os.path.join(folder, name))
                for name in sorted(os.listdir(folder)) if os.path.isfile(os.path.join(folder, name))}

    def manifest(self, stage: str) -> str:
        """model: stage_outputs.StageManifest"""
        return os.path.join(self.stage_dir(stage), "manifest.json")

    def plots(self, stage: str) -> str:
        """Plots drawn from a stage's metrics for MLflow."""
        return os.path.join(self.stage_dir(stage), "plots")

    def attempt(self, stage: str) -> str:
        return os.path.join(self.stage_dir(stage), "attempt.json")

    def failure(self, stage: str) -> str:
        """The last attempt's error, for `pofa status` (gone when the stage starts again). model: FailureRecord"""
        return os.path.join(self.stage_dir(stage), "failure.json")

    # -- preprocess -----------------------------------------------------------------------------
    def split_dir(self, split: str) -> str:
        if split not in SPLITS:
            raise LayoutError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
        return self.path("preprocess", split)

    def shard(self, split: str, name: str) -> str:
        return os.path.join(self.split_dir(split), _plain(name, "shard"))

    def shard_record(self, shard_id: str) -> str:
        """A processed shard's completion record: its presence means the shard is done. model: ShardRecord"""
        return self.path("preprocess", ".shards", f"{_plain(shard_id, 'shard id')}.json")

    # -- training stages ------------------------------------------------------------------------
    def training(self, stage: str) -> TrainRunLayout:
        if stage not in ("teacher", "student"):
            raise LayoutError(f"training stage {stage!r}: expected teacher or student")
        return TrainRunLayout(self.stage_dir(stage), stage)

    # -- fine-tuning ----------------------------------------------------------------------------
    def task_dir(self, task: str) -> str:
        return self.path("finetune", _plain(task, "task"))

    def task_data(self, task: str) -> TaskDataLayout:
        return TaskDataLayout(os.path.join(self.task_dir(task), "data"))

    def task_model(self, task: str) -> str:
        return os.path.join(self.task_dir(task), "model")

    def finetune_run(self, task: str, run: str) -> TrainRunLayout:
        """`run`: "teacher" or "seed-<s>"."""
        return TrainRunLayout(os.path.join(self.task_dir(task), _plain(run, "fine-tuning run")),
                              f"finetune/{task}/{run}")

    # -- the store (no-ops on local disk) -------------------------------------------------------
    def pull(self, path: str, prune: bool = False, exclude: Callable[[str], bool] = except_checkpoints,
             only: Optional[Callable[[str], bool]] = None) -> int:
        """This node's copy of `path` (a file or folder) brought up to date from the store; checkpoints
        travel their own way (each rank fetches its share)."""
        return self.store.pull(self.rel(path), exclude=exclude, only=only, prune=prune)

    def push(self, path: Optional[str] = None, exclude: Callable[[str], bool] = except_checkpoints) -> int:
        """This node's new or changed files under `path` (default: the whole run) to the store,
        commit markers last; checkpoints travel their own way."""
        return self.store.push(self.rel(path) if path else "", exclude=exclude)

    def push_files(self, paths: Iterable[str]) -> None:
        self.store.push_files([self.rel(p) for p in paths])

    def delete_stored(self, path: str) -> None:
        """`path` gone from the store (on local disk: gone)."""
        self.store.delete(self.rel(path))


__all__ = ["RunLayout", "TrainRunLayout", "TaskDataLayout", "LayoutError", "StorageError", "SPLITS", "STAGE_NAMES"]
