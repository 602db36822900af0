"""Static MLM masking at preprocessing time: 15% of tokens, 80% [MASK] / 10% random / 10% unchanged."""
from __future__ import annotations

import random
from dataclasses import dataclass


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
