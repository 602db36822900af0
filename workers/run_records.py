"""The files a run writes, each declared once: a pydantic model beside where the file lives.

    file (path from RunLayout / TrainRunLayout)            model
    <train run>/checkpoints/step-N/MANIFEST.json           CheckpointManifest (the commit; checkpointer.py)
    <train run>/checkpoints/corrupt-step-N-*/CORRUPT.json  CorruptRecord (a checkpoint set aside)
    <train run>/attempts.jsonl (one record a line)         AttemptRecord
    <train run>/train_summary.json                         TrainSummary
    finetune/<task>/<run>/result.json                      stage_outputs.FinetuneRunOutput
    <stage>/failure.json                                   FailureRecord
    preprocess/.shards/<shard id>.json                     ShardRecord (a processed shard's completion record)
    <stage>/manifest.json                                  stage_outputs.StageManifest

Producers build the model and write it with `write_record` / `append_record`; readers get the model
back from `read_record` / `read_record_lines` (or `parse_record` for JSON fetched from the store),
never a dict read by key: a missing key is an error here, not a None downstream. A file from
another pofa version or with a bad field fails with one RecordError naming the file, the field and
the stage to redo. Fields added after a file's first version carry a default, so older runs load.
"""
from __future__ import annotations

import json
from typing import Any, Literal, Optional, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipelines.atomic import write_json_atomic
from workers.jsonl import read_jsonl


class RecordError(ValueError):
    """A run file that does not match its model: names the file, the field and what to redo."""


class Record(BaseModel):
    """Base of every run file's model: unknown keys are errors (a producer must declare what it adds)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


R = TypeVar("R", bound=BaseModel)


def redo_hint(stage: str) -> str:
    return f"redo the {stage} stage: pofa run RECIPE --stages {stage} --force"


def field_errors(exc: ValidationError, prefix: str = "") -> str:
    """"field a.b is missing; field c: <why>" for every problem pydantic found."""
    parts = []
    for err in exc.errors():
        key = ".".join(str(p) for p in ((prefix,) if prefix else ()) + tuple(err["loc"]))
        parts.append(f"field {key} is missing" if err["type"] == "missing" else f"field {key}: {err['msg']}")
    return "; ".join(parts)


def parse_record(model: type[R], raw: object, where: str, stage: str) -> R:
    """`raw` (decoded JSON read from `where`) as `model`; RecordError naming file, field and stage."""
    if not isinstance(raw, dict):
        raise RecordError(f"{where}: not a JSON object; {redo_hint(stage)}")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise RecordError(f"{where}: {field_errors(exc)}; {redo_hint(stage)}") from None


def dump_record(record: BaseModel) -> dict[str, Any]:
    """The JSON form: the keys the producer set (a default it left out stays out, as before typing)."""
    return record.model_dump(mode="json", exclude_unset=True)


def read_record(model: type[R], path: str, stage: str) -> R:
    """A JSON file as `model` (OSError when it is missing or unreadable, RecordError when invalid)."""
    with open(path, "rb") as f:
        blob = f.read()
    try:
        raw = json.loads(blob)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RecordError(f"{path}: not readable JSON ({exc}); {redo_hint(stage)}") from None
    return parse_record(model, raw, path, stage)


def write_record(record: BaseModel, path: str) -> None:
    """Atomic (temporary file, fsync, rename): a reader sees the old file or the new, never half."""
    write_json_atomic(dump_record(record), path)


def read_record_lines(model: type[R], path: str, stage: str, repair: bool = True) -> list[R]:
    """Every complete line of a JSON Lines file as `model` ([] when absent); a torn last line is
    dropped (and cut off when `repair`), as workers/jsonl.py does for every appended file."""
    return [parse_record(model, raw, f"{path} line {n}", stage)
            for n, raw in enumerate(read_jsonl(path, repair=repair), 1)]


def append_record(record: BaseModel, path: str) -> None:
    """One line at the end of a JSON Lines file (call `read_record_lines` first: it repairs a torn end)."""
    with open(path, "a") as f:
        f.write(json.dumps(dump_record(record)) + "\n")


# -- <train run>/checkpoints/step-N/MANIFEST.json -------------------------------------------------------
class CheckpointFile(Record):
    size: int = Field(ge=0)
    sha256: str


class CheckpointManifest(Record):
    """A checkpoint's commit, written last: a step folder without it is never loaded."""

    format: int
    step: int = Field(ge=0)
    world_size: int = Field(ge=1)
    created: float
    parts: list[str]  # saved once by rank 0
    rank_parts: list[str]  # one copy per rank
    # the worker's settings (Checkpointer `meta`); absent from checkpoints written without them
    zero_stage: Optional[int] = None
    precision: Optional[str] = None
    global_batch_size: Optional[int] = None
    files: dict[str, CheckpointFile]  # path in the step folder -> size and sha256


class CorruptRecord(Record):
    """CORRUPT.json, beside a checkpoint set aside: why, and its MANIFEST.json as it was (rename both
    back to undo). Kept raw: the manifest may be the very thing that did not read."""

    reason: str
    manifest: Any = None
    time: float


# -- <train run>/attempts.jsonl ----------------------------------------------------------------------
class AttemptRecord(Record):
    """One training attempt's start, appended by rank 0 once it has resumed."""

    start_step: int = Field(ge=0)
    checkpoint: Optional[str]  # where it resumed from; None for a fresh start
    time: float
    nodes: list[str] = []  # the Ray node of every rank
    startup_s: Optional[float] = None  # worker start to resumed (recorded since the stall watchdog)


# -- <train run>/train_summary.json ------------------------------------------------------------------
class TrainSummary(Record):
    """How the attempt that finished a training run ended; written by rank 0, read by the driver."""

    stage: str  # the run's name: teacher, student, finetune/<task>/<run>
    final_step: int = Field(ge=0)
    max_steps: int = Field(ge=0)
    preempted: bool = False  # stopped at a checkpoint by a preemption notice: resume, not finished
    start_step: int = Field(ge=0)
    world_size: int = Field(ge=1)
    global_batch_size: int
    zero_stage: int
    precision: str
    model_dir: str
    checkpoint: Optional[str]  # the last committed checkpoint
    metrics: dict[str, float]  # the last training and validation metrics
    export_sparsity: Optional[float] = None  # the export's global sparsity (pruned runs)
    quantization: Optional[dict[str, Any]] = None  # the QAT export's report (fine-tuning with qat)
    attempt_elapsed_s: Optional[float] = None
    timings: dict[str, Any] = {}  # start-up and checkpoint times, for `make bench-train`
    teacher_frozen: Optional[bool] = None  # pretraining with a teacher: it received no updates


# -- preprocess/.shards/<shard id>.json --------------------------------------------------------------------
class ShardInfo(Record):
    """One Parquet file of a split (also listed in the preprocess stage's output record)."""

    name: str  # file name inside the split's folder
    rows: int = Field(ge=0)
    sha256: str


class ShardStatsRecord(Record):
    """pipelines.data.shard.ShardStats.as_dict(): what one shard made, summed by the driver."""

    documents: dict[str, int]  # split -> documents that made instances
    instances: dict[str, int]  # split -> instances
    skipped: dict[str, int]  # reason -> documents skipped
    sentences: int
    tokens: int
    short_instances: int
    random_next: int
    masked_tokens: int
    maskable_tokens: int
    length_histogram: dict[str, int]  # instance length bucket -> count


class ShardRecord(Record):
    """A processed shard: its presence (with its files' hashes matching) means the shard is done. The
    processor also hands it to the driver, which sums the stage's statistics and output from them."""

    shard_id: str
    unit: Optional[int] = None  # the read unit it came from; None in older records (the id's first part)
    stats: ShardStatsRecord
    shards: dict[Literal["train", "validation"], ShardInfo]  # a split with no instances is absent
    read_span: tuple[float, float] = (0.0, 0.0)  # the part of its unit it was read from (progress only)


# -- <stage>/failure.json ----------------------------------------------------------------------------
class FailureRecord(Record):
    """The last attempt's error, for `pofa status` (removed when the stage starts again)."""

    error: str  # the error's first line
    type: str  # its class name
    log: Optional[str]  # where the traceback and the workers' logs are
    time: float


__all__ = ["RecordError", "Record", "CheckpointFile", "CheckpointManifest", "CorruptRecord", "AttemptRecord",
           "TrainSummary", "FailureRecord", "ShardInfo", "ShardStatsRecord", "ShardRecord", "parse_record", "dump_record", "read_record", "write_record",
           "read_record_lines", "append_record", "redo_hint", "field_errors"]
