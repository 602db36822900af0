"""The recipe: one YAML document, one typed section per stage, validated before any cluster work."""
from __future__ import annotations

import re
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

from orchestrator.tracking.config import TrackingConfig
from pipelines.data.config import PreprocessConfig

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class RayConfig(BaseModel):
    """Where the job graph runs. No address: a local Ray instance, dashboard on 127.0.0.1 only."""

    model_config = ConfigDict(extra="forbid")
    address: Optional[str] = None
    num_cpus: Optional[int] = Field(default=None, ge=1)
    dashboard_host: str = "127.0.0.1"


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    seed: int = Field(default=42, ge=0, lt=2**31)
    run_dir: Optional[str] = None
    stages: list[Literal["preprocess"]] = ["preprocess"]
    ray: RayConfig = RayConfig()
    preprocess: PreprocessConfig
    tracking: TrackingConfig = TrackingConfig()

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        # The name becomes a folder under ./runs: it must never climb out of it.
        if not _NAME.match(v) or ".." in v:
            raise ValueError(f"{v!r} is not a safe run name (letters, digits, '.', '_', '-'; no '..')")
        return v
