"""Typed recipe section for the model (`model:` in a recipe)."""
from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator


class BertInit(BaseModel):
    """A small BERT initialised from scratch (offline recipes and tests); vocab comes from the tokenizer."""

    model_config = ConfigDict(extra="forbid")

    hidden_size: int = Field(default=64, ge=8)
    num_hidden_layers: int = Field(default=2, ge=1)
    num_attention_heads: int = Field(default=2, ge=1)
    intermediate_size: int = Field(default=128, ge=8)
    max_position_embeddings: int = Field(default=512, ge=8)

    @model_validator(mode="after")
    def _check(self) -> "BertInit":
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"model.init.hidden_size={self.hidden_size} is not divisible by "
                             f"model.init.num_attention_heads={self.num_attention_heads}")
        return self


class ModelConfig(BaseModel):
    """`name`: a hub name or local path of a pretrained model; or `name: null` with `init` to build from scratch."""

    model_config = ConfigDict(extra="forbid")

    name: Optional[str] = None
    init: Optional[BertInit] = None

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        if self.name is not None and self.init is not None:
            raise ValueError(f"model.name={self.name!r} and model.init are exclusive: pick one")
        if self.name is None and self.init is None:
            self.init = BertInit()
        return self
