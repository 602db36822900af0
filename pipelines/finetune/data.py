"""A task's train and evaluation splits, from the hub, local files or one labelled file, validated up front.

Every problem a fine-tuning run would otherwise hit hours in (a missing column, a label out of range, a
SQuAD answer that is not where it says) is found here, before any training. Rows that are skipped
(malformed lines, unanswerable or misaligned answers) and rows left out by `max_*_examples` are counted
in the returned stats, which the stage records in its manifest.
"""
from __future__ import annotations

import logging
import os
import re
from typing import Any, Optional

import datasets
import numpy as np
import pyarrow as pa

from pipelines.data.paths import resolve_source_path
from pipelines.finetune.config import TaskData
from pipelines.finetune.tasks import TaskSpec

log = logging.getLogger(__name__)

_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}
_FASTTEXT = (".cor", ".txt")  # `__label__<name> text` lines, one example each
_LABEL_LINE = re.compile(r"^__label__(\S+)\s+(.*\S)\s*$")
# Datasets addressed without an owner prefix whose second path part is a config: "glue/mnli".
_CONFIG_DATASETS = {"glue", "super_glue"}

Stats = dict[str, int]


def load_task_splits(task: TaskSpec, data: TaskData) -> tuple[dict[str, datasets.Dataset], Stats]:
    """{task.train_split: ds, <eval split name>: ds, ...} holding only the task's columns, and stats."""
    stats: Stats = {}
    path = data.path or (task.default_path if data.dataset is None and data.files is None else None)
    if path is not None:
        where = f"file {path}"
        full = _read_file(task, path, where, stats)
        full = _validate(task, where, full, train=True, stats=stats, prefix="file")
        splits = _holdout(task, full, data)
    elif data.files is not None:
        splits = _load_files(task, data.files, stats)
    else:
        splits = _pick_splits(task, _load_named(task, data.dataset), data.dataset)
    out: dict[str, datasets.Dataset] = {}
    for split, ds in splits.items():
        train = split == task.train_split
        if path is None:  # a labelled file was validated whole, before it was split
            ds = _validate(task, f"split {split!r}", ds, train=train, stats=stats, prefix=split)
        limit = data.max_train_examples if train else data.max_eval_examples
        stats[f"{split}_available"] = len(ds)
        if limit is not None and len(ds) > limit:
            # Seeded choice, kept in file order (SQuAD questions on one paragraph stay together).
            keep = np.sort(np.random.default_rng(data.split_seed).permutation(len(ds))[:limit])
            ds = ds.select(keep.tolist())
        stats[f"{split}_subset_dropped"] = stats[f"{split}_available"] - len(ds)
        stats[f"{split}_examples"] = len(ds)
        out[split] = ds
    return out, stats


def needed_columns(task: TaskSpec) -> tuple[str, ...]:
    extra = ("id",) if task.kind == "qa" else ()  # QA predictions are keyed by example id
    return extra + task.text_columns + (task.label_column,)


def _split_names(task: TaskSpec) -> list[str]:
    return [task.train_split, *task.eval_splits.values()]


# ---- sources ----

def _load_named(task: TaskSpec, name: Optional[str]) -> datasets.DatasetDict:
    """The task's hub dataset (name None), another hub dataset, or a local dataset folder."""
    if name is None:
        if not task.hub:
            raise ValueError(f"task {task.name}: has no hub dataset; give finetune.tasks[].data.path or files")
        return datasets.load_dataset(*task.hub)
    local = resolve_source_path(name)
    if os.path.isdir(local):
        if os.path.exists(os.path.join(local, "dataset_dict.json")):  # written by DatasetDict.save_to_disk
            return datasets.load_from_disk(local)
        return datasets.load_dataset(local)
    return datasets.load_dataset(*hub_args(name))


def hub_args(name: str) -> tuple[str, ...]:
    """`load_dataset` args for a recipe's dataset name: "glue/mnli" -> ("glue", "mnli");
    "owner/name:config" -> ("owner/name", "config"); anything else is one hub path ("rajpurkar/squad")."""
    if ":" in name:
        path, _, config = name.partition(":")
        return (path, config)
    owner, _, rest = name.partition("/")
    if owner in _CONFIG_DATASETS and rest and "/" not in rest:
        return (owner, rest)
    return (name,)


def _pick_splits(task: TaskSpec, dd: Any, source: Optional[str]) -> dict[str, datasets.Dataset]:
    label = source or "/".join(task.hub)
    if not isinstance(dd, datasets.DatasetDict):
        raise ValueError(f"task {task.name}: dataset {label!r} is a single split, not a DatasetDict with "
                         f"splits {_split_names(task)}")
    missing = [s for s in _split_names(task) if s not in dd]
    if missing:
        raise ValueError(f"task {task.name}: dataset {label!r} lacks split(s) {missing}; "
                         f"splits found: {sorted(dd)}")
    return {s: dd[s] for s in _split_names(task)}


def _load_files(task: TaskSpec, files: dict[str, str], stats: Stats) -> dict[str, datasets.Dataset]:
    wanted = _split_names(task)
    missing = [s for s in wanted if s not in files]
    unknown = [s for s in files if s not in wanted]
    if missing or unknown:
        raise ValueError(f"task {task.name}: data.files must name exactly the splits {wanted}; "
                         f"missing {missing}, unexpected {unknown}")
    return {s: _read_file(task, files[s], f"split {s!r}", stats) for s in wanted}


def _read_file(task: TaskSpec, path: str, where: str, stats: Stats) -> datasets.Dataset:
    local = resolve_source_path(path)
    if not os.path.isfile(local):
        raise ValueError(f"task {task.name}: {where}: no such file {path!r}")
    ext = os.path.splitext(local)[1].lower()
    if ext in _FASTTEXT:
        return _read_fasttext(task, local, where, stats)
    if ext not in _BUILDERS:
        raise ValueError(f"task {task.name}: {where}: unsupported file type {ext!r} of {path!r}; "
                         f"use one of {sorted(_BUILDERS) + list(_FASTTEXT)}")
    kwargs = {"delimiter": "\t"} if ext == ".tsv" else {}
    return datasets.load_dataset(_BUILDERS[ext], data_files=local, split="train", **kwargs)


def _read_fasttext(task: TaskSpec, path: str, where: str, stats: Stats) -> datasets.Dataset:
    """`__label__neg some text .` lines (the gensim polarity file). Malformed lines are counted and skipped."""
    if task.kind != "classification" or len(task.text_columns) != 1:
        raise ValueError(f"task {task.name}: {where}: `__label__` text files hold single sentences; "
                         f"this task needs columns {needed_columns(task)}")
    texts: list[str] = []
    labels: list[int] = []
    malformed = blank = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = _decode(raw)
            if not line.strip():
                blank += 1
                continue
            m = _LABEL_LINE.match(line)
            name = m.group(1) if m else None
            if name in task.label_names:
                label = task.label_names.index(name)
            elif name is not None and re.fullmatch(r"-?\d+", name):
                label = int(name)  # range-checked with the other labels, an error not a skip
            else:
                malformed += 1
                if malformed <= 3:
                    log.warning("task %s: %s line %d is not `__label__{%s} text`: %r", task.name, path, lineno,
                                ",".join(task.label_names), line[:80])
                continue
            texts.append(m.group(2))
            labels.append(label)
    stats["malformed_skipped"] = stats.get("malformed_skipped", 0) + malformed
    stats["blank_lines_skipped"] = stats.get("blank_lines_skipped", 0) + blank
    features = datasets.Features({task.text_columns[0]: datasets.Value("string"),
                                  task.label_column: datasets.Value("int64")})
    return datasets.Dataset.from_dict({task.text_columns[0]: texts, task.label_column: labels}, features=features)


def _decode(raw: bytes) -> str:
    # The Pang & Lee sentences are Windows-1252 (e.g. 0x97 for an em dash), not UTF-8.
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace")


def _holdout(task: TaskSpec, full: datasets.Dataset, data: TaskData) -> dict[str, datasets.Dataset]:
    """One labelled file -> train + the task's single eval split, the same on every call for one seed."""
    if len(task.eval_splits) != 1:
        raise ValueError(f"task {task.name}: data.path gives one file but the task evaluates on "
                         f"{len(task.eval_splits)} splits {list(task.eval_splits.values())}; use data.files")
    stratify = None
    if task.kind == "classification":  # keep the class balance in both parts of a small file
        names = list(task.label_names) or [str(i) for i in range(task.num_labels)]
        full = full.cast_column(task.label_column, datasets.ClassLabel(names=names))
        stratify = task.label_column
    try:
        parts = full.train_test_split(test_size=data.holdout_fraction, seed=data.split_seed,
                                      stratify_by_column=stratify)
    except ValueError as exc:
        raise ValueError(f"task {task.name}: cannot hold out {data.holdout_fraction} of {len(full)} rows "
                         f"for evaluation: {exc}") from exc
    out = {task.train_split: parts["train"], next(iter(task.eval_splits.values())): parts["test"]}
    if stratify:  # back to plain ints, like every other source
        out = {s: d.cast_column(stratify, datasets.Value("int64")) for s, d in out.items()}
    return out


# ---- validation ----

def _validate(task: TaskSpec, where: str, ds: datasets.Dataset, train: bool, stats: Stats,
              prefix: str) -> datasets.Dataset:
    cols = needed_columns(task)
    missing = [c for c in cols if c not in ds.column_names]
    if missing:
        raise ValueError(f"task {task.name}: {where} lacks column(s) {missing}; columns found: {ds.column_names}")
    ds = ds.select_columns(list(cols))
    table = ds.with_format("arrow")[:]  # honours any indices mapping
    for col in task.text_columns:
        nulls = table.column(col).null_count
        if nulls:
            raise ValueError(f"task {task.name}: {where}: column {col!r} is empty in {nulls} row(s)")
    if task.kind == "classification":
        _check_labels(task, where, table.column(task.label_column))
        return ds
    return _clean_answers(task, where, ds, table, train, stats, prefix)


def _check_labels(task: TaskSpec, where: str, col: pa.ChunkedArray) -> None:
    name = task.label_column
    if col.null_count:
        raise ValueError(f"task {task.name}: {where}: column {name!r} is empty in {col.null_count} row(s)")
    if not pa.types.is_integer(col.type):
        sample = col.slice(0, 1).to_pylist()
        raise ValueError(f"task {task.name}: {where}: labels in {name!r} must be ints in [0, {task.num_labels}), "
                         f"got type {col.type} (first value {sample[0] if sample else None!r})")
    values = col.to_numpy()
    bad = (values < 0) | (values >= task.num_labels)
    if bad.any():
        raise ValueError(f"task {task.name}: {where}: label {int(values[bad][0])} is outside [0, {task.num_labels}) "
                         f"in {int(bad.sum())} row(s) (bad values: {sorted(set(values[bad].tolist()))[:10]})")


def _clean_answers(task: TaskSpec, where: str, ds: datasets.Dataset, table: pa.Table, train: bool,
                   stats: Stats, prefix: str) -> datasets.Dataset:
    """SQuAD answers: malformed -> error; none -> skipped (v1.1 scores need gold); training rows whose first
    answer is not at its `answer_start` -> skipped, since their token labels would be wrong."""
    contexts = table.column(task.text_columns[1]).to_pylist()
    answers = table.column(task.label_column).to_pylist()
    keep: list[int] = []
    unanswerable = misaligned = 0
    for i, (context, ans) in enumerate(zip(contexts, answers)):
        texts, starts = _answer_lists(task, where, i, ans)
        if not texts:
            unanswerable += 1
        elif train and context[starts[0]:starts[0] + len(texts[0])] != texts[0]:
            misaligned += 1
        else:
            keep.append(i)
    stats[f"{prefix}_unanswerable_skipped"] = unanswerable
    stats[f"{prefix}_misaligned_skipped"] = misaligned
    return ds if len(keep) == len(ds) else ds.select(keep)


def _answer_lists(task: TaskSpec, where: str, row: int, ans: Any) -> tuple[list[str], list[int]]:
    ok = isinstance(ans, dict) and isinstance(ans.get("text"), list) and isinstance(ans.get("answer_start"), list)
    if ok:
        texts, starts = ans["text"], ans["answer_start"]
        ok = (len(texts) == len(starts) and all(isinstance(t, str) and t for t in texts)
              and all(isinstance(s, int) and s >= 0 for s in starts))
    if not ok:
        raise ValueError(f"task {task.name}: {where} row {row}: {task.label_column!r} must be "
                         f"{{'text': [str, ...], 'answer_start': [int, ...]}} of equal length, got {ans!r}")
    return texts, starts
