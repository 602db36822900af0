"""Typed pruning recipe section (`pruning:` in a recipe).

Pure-config checks live here (they need no model); checks that need the model (patterns select
something, block shapes divide every layer) are in `selection.validate_against_model`.
Every error names its key as `pruning.<path>` so a recipe author can find it.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

KEY = "pruning"

# Defaults follow the paper: every nn.Linear weight of the encoder (and pooler) is pruned;
# embeddings, LayerNorm, biases and pre-training / task heads stay dense. Regexes, `re.search`
# on the full parameter name. `transformer.` covers DistilBERT's `distilbert.transformer.layer.N`.
DEFAULT_INCLUDE = [r"(^|\.)encoder\.", r"(^|\.)pooler\.", r"(^|\.)transformer\."]
DEFAULT_EXCLUDE = [
    r"(^|\.)cls\.",
    r"(^|\.)qa_outputs\.",
    r"(^|\.)classifier\.",
    r"(^|\.)pre_classifier\.",
    r"(^|\.)lm_head\.",
    r"(^|\.)embeddings\.",
    r"LayerNorm|layer_norm",
    r"\.bias$",
]


class ScheduleConfig(BaseModel):
    """When masks change and to which sparsity (see `schedules.py`)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["cubic", "one_shot", "constant"] = "cubic"
    policy_begin_step: int = Field(0, ge=0)
    policy_end_step: int = Field(50_000, ge=0)
    begin_pruning_step: int = Field(0, ge=0)
    end_pruning_step: int = Field(80_000, ge=-1)  # -1: masks may change until training ends
    pruning_frequency: int = Field(1_000, ge=1)
    initial_sparsity: float = 0.0
    final_sparsity: float = 0.9

    @field_validator("initial_sparsity", "final_sparsity")
    @classmethod
    def _in_unit_interval(cls, v: float, info) -> float:
        if not 0.0 <= v < 1.0:
            raise ValueError(f"{KEY}.schedule.{info.field_name}={v!r} must be in [0, 1)")
        return v

    @model_validator(mode="after")
    def _ordered(self) -> "ScheduleConfig":
        if self.kind == "cubic" and self.policy_end_step <= self.policy_begin_step:
            raise ValueError(
                f"{KEY}.schedule.policy_end_step={self.policy_end_step} must be greater than "
                f"{KEY}.schedule.policy_begin_step={self.policy_begin_step}"
            )
        if self.end_pruning_step != -1 and self.end_pruning_step < self.begin_pruning_step:
            raise ValueError(
                f"{KEY}.schedule.end_pruning_step={self.end_pruning_step} is before "
                f"{KEY}.schedule.begin_pruning_step={self.begin_pruning_step} (use -1 for never)"
            )
        if self.initial_sparsity > self.final_sparsity:
            raise ValueError(
                f"{KEY}.schedule.initial_sparsity={self.initial_sparsity} exceeds "
                f"{KEY}.schedule.final_sparsity={self.final_sparsity}"
            )
        return self


class MaskConfig(BaseModel):
    """Shape of the zero pattern. Blocks and N:M groups run along the input dimension
    (the last axis of an `nn.Linear` weight [out, in])."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["unstructured", "block", "nm"] = "unstructured"
    block_shape: tuple[int, int] = (1, 4)  # [rows (out), cols (in)]
    n: int = 2  # N:M keeps n of every m consecutive weights
    m: int = 4

    @field_validator("block_shape")
    @classmethod
    def _positive_block(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] < 1 or v[1] < 1:
            raise ValueError(f"{KEY}.mask.block_shape={list(v)} must be positive")
        return v

    @model_validator(mode="after")
    def _nm(self) -> "MaskConfig":
        if self.kind == "nm" and not 1 <= self.n < self.m:
            raise ValueError(f"{KEY}.mask.n={self.n} must satisfy 1 <= n < {KEY}.mask.m={self.m}")
        return self


class PruningConfig(BaseModel):
    """The `pruning:` section of a recipe."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["gmp"] = "gmp"  # gradual magnitude pruning (Zhu & Gupta 2017)
    schedule: ScheduleConfig = ScheduleConfig()
    mask: MaskConfig = MaskConfig()
    allocation: Literal["uniform", "global", "erk"] = "uniform"
    include: list[str] = Field(default_factory=lambda: list(DEFAULT_INCLUDE))
    exclude: list[str] = Field(default_factory=lambda: list(DEFAULT_EXCLUDE))
    # Intel's reference (model_compression_research/pruning/methods/magnitude_method.py): the mask
    # multiplies the weight in the forward pass, the stored value and its optimizer state live on, and
    # each mask update rescores the stored values, so a pruned weight can come back while the schedule
    # runs. "zero": pruned weights and their Adam moments are zeroed after every step (masks only grow;
    # pofa before 0.2).
    pruned_weights: Literal["keep", "zero"] = "keep"
    lr_rewind: bool = False
    # The window the LR is rewound in. "policy" (the reference: run_mlm.py passes policy_begin_step ..
    # policy_end_step to api_utils.get_linear_rewinding_schedule_with_warmup); "pruning": begin/end_pruning_step.
    lr_rewind_window: Literal["policy", "pruning"] = "policy"
    # Clamp the rewinding multiplier at 1.0 (pofa before 0.2); the reference does not (1.0204 at a rewind).
    lr_rewind_clamp: bool = False

    @field_validator("include", "exclude")
    @classmethod
    def _valid_regexes(cls, v: list[str], info) -> list[str]:
        import re

        for i, pattern in enumerate(v):
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"{KEY}.{info.field_name}[{i}]={pattern!r} is not a regex: {err}") from err
        if info.field_name == "include" and not v:
            raise ValueError(f"{KEY}.include is empty: it would select no parameter")
        return v

    @model_validator(mode="after")
    def _rewind_options(self) -> "PruningConfig":
        if not self.lr_rewind and (self.lr_rewind_clamp or self.lr_rewind_window != "policy"):
            raise ValueError(f"{KEY}.lr_rewind_window / {KEY}.lr_rewind_clamp are set but {KEY}.lr_rewind is false: "
                             "they would change nothing")
        return self

    @model_validator(mode="after")
    def _nm_is_uniform(self) -> "PruningConfig":
        # N:M fixes the sparsity of every group, so only per-layer (uniform) allocation makes sense.
        if self.mask.kind == "nm" and self.allocation != "uniform":
            raise ValueError(f"{KEY}.allocation={self.allocation!r} is not supported with {KEY}.mask.kind='nm'")
        return self
