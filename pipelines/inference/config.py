"""The `report:` recipe section. Its values decide what the report stage writes, and only the report
stage reads them: result-defining for that stage (changing them redoes the report, which is rebuilt
freely), invisible to every other stage's fingerprint."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class InferenceConfig(BaseModel):
    """`report.inference`: CPU throughput and latency of every exported model, and its sizes."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    # Latency is read at the smallest batch size (1), throughput at the largest (32).
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 32])
    seq_len: int = Field(default=128, ge=8, le=4096)
    # ONNX Runtime: maintained (Microsoft), a CPU execution provider on every platform, int8 dynamic
    # quantization built in, pip-installable wheels for every Python pofa supports. OpenVINO is the
    # alternative (faster on some Intel CPUs) but adds a second converter; not implemented here.
    runtime: Literal["onnxruntime"] = "onnxruntime"
    min_seconds: float = Field(default=2.0, gt=0, le=600)  # timed per batch size (at least 3 runs, after a warm-up)

    @field_validator("batch_sizes")
    @classmethod
    def _positive_unique(cls, v: list[int]) -> list[int]:
        if not v or any(b < 1 for b in v):
            raise ValueError(f"report.inference.batch_sizes={v}: give at least one batch size, each >= 1")
        return sorted(set(v))


class ReportConfig(BaseModel):
    """The `report:` section of a recipe."""

    model_config = ConfigDict(extra="forbid")

    inference: InferenceConfig = InferenceConfig()
