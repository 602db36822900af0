"""The recipe's distillation section (`student.distillation`, `finetune.distillation`): apart from the
losses in `pipelines/distillation.py` so that reading a recipe (the CLI, `pofa plan`) imports no torch."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class DistillationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hard_weight: float = Field(0.5, ge=0.0)
    kd_weight: float = Field(0.5, ge=0.0)
    temperature: float = Field(2.0, gt=0.0)
    # MLM distillation over every non-padding token (the reference) or only the masked ones
    mlm_positions: Literal["tokens", "masked"] = "tokens"
    # How the MLM and NSP KL terms of pretraining combine: sum (the reference) or mean (pofa before 0.2)
    mlm_nsp_kd: Literal["sum", "mean"] = "sum"
