"""`<run_dir>/tracking.json`: which MLflow runs belong to this run directory.

Rerunning a pipeline on the same run directory must find its parent run and the nested run of
an unfinished stage again instead of creating new ones. Ids are kept per tracking store, so a
run directory first recorded locally and later pointed at a server gets its own runs there.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from pipelines.atomic import write_text_atomic
from pydantic import BaseModel, ConfigDict, Field

REGISTRY_FILE = "tracking.json"


class StageEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    run_id: str
    status: str = "RUNNING"


class StoreEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    experiment_id: str
    parent_run_id: str
    status: str = "RUNNING"
    stages: dict[str, StageEntry] = Field(default_factory=dict)


class RunRegistry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = 1
    stores: dict[str, StoreEntry] = Field(default_factory=dict)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "RunRegistry":
        """From the run's `tracking.json` (empty when there is none yet)."""
        path = Path(path)
        if not path.exists():
            return cls()
        try:
            return cls.model_validate_json(path.read_text())
        except ValueError as exc:
            raise ValueError(
                f"{path}: not a pofa tracking registry ({exc}); move it away to start new MLflow runs"
            ) from exc

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write atomically: a crash mid-write must not lose the ids of existing runs."""
        write_text_atomic(json.dumps(self.model_dump(), indent=2, sort_keys=True) + "\n", str(path))
