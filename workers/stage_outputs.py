"""What each stage hands the next: a typed output record inside its manifest.

A stage ends by writing `<run>/<stage>/manifest.json` (a `StageManifest`); its `output` field is the
stage's record (`PreprocessOutput`, `TrainingOutput`, `FinetuneOutput`, `ReportOutput`). Consumers
read it with `read_output`, through the same model the producer wrote it with: never by string
keys. A manifest from another pofa version, or one missing a field, fails with an error that names
the file, the field and the stage to redo.
"""
from __future__ import annotations

import json
import os
from typing import Any, Literal, Optional, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipelines.atomic import write_json_atomic
from pipelines.data.masking import MaskingContract
from workers.run_layout import RunLayout
from workers.run_records import Record as _Record
from workers.run_records import ShardInfo  # the shard completion record's file entry, listed here too
from workers.run_records import field_errors as _fields
from workers.run_records import redo_hint as _redo

MANIFEST_FORMAT = 2  # 2: typed output records; bump when a record changes incompatibly


class ManifestError(ValueError):
    """A stage manifest that cannot be trusted: names the file, the field and what to redo."""


# -- preprocess ------------------------------------------------------------------------------------
class SplitOutput(_Record):
    shards: list[ShardInfo]
    rows: int = Field(ge=0)

    @model_validator(mode="after")
    def _rows_add_up(self) -> "SplitOutput":
        if sum(s.rows for s in self.shards) != self.rows:
            raise ValueError(f"rows={self.rows} but the shards hold {sum(s.rows for s in self.shards)}")
        return self


class PreprocessOutput(_Record):
    splits: dict[Literal["train", "validation"], SplitOutput]
    tokenizer: str  # folder, relative to the run directory (resolve with RunLayout.path)
    masking: MaskingContract
    max_seq_length: int = Field(ge=8)
    vocab_size: int = Field(ge=1)


# -- teacher / student -------------------------------------------------------------------------------
class TrainingOutput(_Record):
    model: str  # the exported Hugging Face folder, relative to the run directory
    final_step: int = Field(ge=0)
    sparsity: Optional[float] = None  # the export's global sparsity (student)
    metrics: dict[str, float] = {}  # the last training and validation metrics


# -- finetune ------------------------------------------------------------------------------------------
class FinetuneRunOutput(_Record):
    """One finished fine-tuning run (a task's dense teacher or one seed), also its `result.json`."""

    name: str
    seed: int
    model: str  # relative to the run directory
    final_step: int = Field(ge=0)
    metrics: dict[str, float]
    sparsity: Optional[float] = None
    quantization: Optional[dict[str, Any]] = None
    train_time_s: float = 0.0
    started: Optional[float] = None  # when the run started and finished (runs of a stage overlap)
    finished: Optional[float] = None
    nodes: list[str] = []  # the Ray node of every rank of its last attempt


class FinetuneTaskOutput(_Record):
    model: str  # the first seed's export, relative to the run directory
    teacher: Optional[FinetuneRunOutput] = None  # None when the recipe gave a fine-tuned teacher
    seeds: dict[str, FinetuneRunOutput]


class FinetuneOutput(_Record):
    tasks: dict[str, FinetuneTaskOutput]


# -- report --------------------------------------------------------------------------------------------
class ReportOutput(_Record):
    stages_reported: list[str]


R = TypeVar("R", bound=_Record)


class StageManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: int
    stage: str
    status: Literal["complete"]
    fingerprint: str
    inputs: dict[str, Any]
    config: dict[str, Any]
    stats: dict[str, Any]  # statistics for people and MLflow; never read by another stage
    outputs: dict[str, str]  # file (relative to the stage folder) -> sha256
    output: dict[str, Any]  # the typed record, validated by `read_output`
    started: float
    finished: float
    wall_time_s: float
    pofa_version: str


def load_manifest(layout: RunLayout, stage: str) -> Optional[StageManifest]:
    """The stage's manifest, None when there is none; ManifestError when it cannot be trusted."""
    path = layout.manifest(stage)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: not readable JSON ({exc}); {_redo(stage)}") from None
    if not isinstance(raw, dict):
        raise ManifestError(f"{path}: not a JSON object; {_redo(stage)}")
    if raw.get("format") != MANIFEST_FORMAT:
        raise ManifestError(f"{path}: written by another pofa version (manifest format {raw.get('format', 1)}, "
                            f"this pofa reads {MANIFEST_FORMAT}); {_redo(stage)}")
    try:
        return StageManifest.model_validate(raw)
    except ValidationError as exc:
        raise ManifestError(f"{path}: {_fields(exc)}; {_redo(stage)}") from None


def read_output(layout: RunLayout, stage: str, model: type[R]) -> R:
    """The typed output record of a finished stage, for a consumer that needs it."""
    manifest = load_manifest(layout, stage)
    if manifest is None:
        raise ManifestError(f"{layout.manifest(stage)} is missing: run the {stage} stage first")
    return output_of(manifest, layout, model)


def output_of(manifest: StageManifest, layout: RunLayout, model: type[R]) -> R:
    try:
        return model.model_validate(manifest.output)
    except ValidationError as exc:
        raise ManifestError(f"{layout.manifest(manifest.stage)}: {_fields(exc, 'output')}; "
                            f"{_redo(manifest.stage)}") from None


def write_manifest(layout: RunLayout, manifest: StageManifest, model: type[BaseModel]) -> None:
    """Atomic: a stage is complete exactly when this file exists. `model`: the stage's output model, which
    its record must validate against (a producer bug fails here, not downstream)."""
    model.model_validate(manifest.output)
    write_json_atomic(manifest.model_dump(mode="json"), layout.manifest(manifest.stage))
