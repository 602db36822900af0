"""Static MLM masking at preprocessing time: 15% of tokens, 80% [MASK] / 10% random / 10% unchanged."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class MaskingContract(BaseModel):
    """What the preprocess stage promises about MLM targets, and what training must honour: dynamic
    masks are drawn at batch time with these settings; static masks are stored in the shards
    (`copies` differently masked copies of every instance) and used as they are."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["static", "dynamic"]
    masked_lm_prob: float = Field(gt=0.0, lt=1.0)
    max_predictions_per_seq: int = Field(ge=1)
    copies: int = Field(default=1, ge=1)


@dataclass(frozen=True)
class MaskSettings:
    masked_lm_prob: float
    max_predictions_per_seq: int
    vocab_size: int
    mask_id: int


def mask_instance(input_ids: list[int], special_ids: frozenset[int], settings: MaskSettings,
                  rng: random.Random) -> tuple[list[int], list[int], list[int]]:
    """(masked input_ids, positions, original ids at those positions), positions sorted."""
    candidates = [i for i, t in enumerate(input_ids) if t not in special_ids]
    rng.shuffle(candidates)
    n = min(settings.max_predictions_per_seq, max(1, round(len(input_ids) * settings.masked_lm_prob)), len(candidates))
    chosen = sorted(candidates[:n])
    masked = list(input_ids)
    for pos in chosen:
        r = rng.random()
        if r < 0.8:
            masked[pos] = settings.mask_id
        elif r < 0.9:
            masked[pos] = rng.randrange(settings.vocab_size)
        # else: keep the original token
    return masked, chosen, [input_ids[p] for p in chosen]
