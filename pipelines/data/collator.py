"""Batch the preprocessed Parquet rows for MLM + NSP: padding, attention masks, MLM labels.

Dynamic masking happens here at batch time (15%, 80% [MASK] / 10% random / 10% unchanged) from
an explicit `torch.Generator`, so the trainer decides the seed and a resumed run redraws exactly
the same masks. Static data already carries its masks: only labels are built from them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping, Sequence

import torch

IGNORE_INDEX = -100  # labels torch's cross-entropy ignores: every loss and metric of pofa reads this one


@dataclass(frozen=True)
class CollatorSettings:
    pad_id: int
    mask_id: int
    vocab_size: int
    special_ids: frozenset[int]
    masking: Literal["static", "dynamic"] = "dynamic"
    masked_lm_prob: float = 0.15
    max_predictions_per_seq: int = 20

    def __post_init__(self) -> None:
        if self.masking not in ("static", "dynamic"):
            raise ValueError(f"masking={self.masking!r}: expected 'static' or 'dynamic'")
        if not 0 < self.masked_lm_prob < 1:
            raise ValueError(f"masked_lm_prob={self.masked_lm_prob}: expected 0 < p < 1")
        if self.max_predictions_per_seq < 1:
            raise ValueError(f"max_predictions_per_seq={self.max_predictions_per_seq}: expected >= 1")


def num_predictions(length: int, candidates: int, settings: CollatorSettings) -> int:
    """Same count rule as the static masking of the preprocess stage."""
    return min(settings.max_predictions_per_seq, max(1, round(length * settings.masked_lm_prob)), candidates)


def _dynamic_mask(ids: torch.Tensor, settings: CollatorSettings,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked ids, labels) for one unpadded sequence."""
    special = torch.tensor(sorted(settings.special_ids), dtype=ids.dtype)
    candidates = torch.nonzero(~torch.isin(ids, special)).flatten()
    labels = torch.full_like(ids, IGNORE_INDEX)
    n = num_predictions(len(ids), len(candidates), settings)
    if n == 0:
        return ids, labels
    chosen = candidates[torch.randperm(len(candidates), generator=generator)[:n]]
    labels[chosen] = ids[chosen]
    masked = ids.clone()
    action = torch.rand(n, generator=generator)
    random_tokens = torch.randint(settings.vocab_size, (n,), generator=generator, dtype=ids.dtype)
    masked[chosen] = torch.where(action < 0.8, torch.full_like(random_tokens, settings.mask_id),
                                 torch.where(action < 0.9, random_tokens, ids[chosen]))
    return masked, labels


def _static_labels(ids: torch.Tensor, positions: Sequence[int], originals: Sequence[int]) -> torch.Tensor:
    if len(positions) != len(originals):
        raise ValueError(f"masked_lm_positions ({len(positions)}) and masked_lm_ids ({len(originals)}) differ in length")
    if len(positions) and not 0 <= min(positions) <= max(positions) < len(ids):
        raise ValueError(f"masked_lm_positions {list(positions)} point outside input_ids of length {len(ids)}")
    labels = torch.full_like(ids, IGNORE_INDEX)
    if len(positions):
        labels[torch.as_tensor(positions, dtype=torch.long)] = torch.as_tensor(originals, dtype=ids.dtype)
    return labels


def collate(rows: Sequence[Mapping], settings: CollatorSettings,
            generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Pad a list of rows (dicts with the Parquet columns) into model inputs with MLM labels and NSP labels.
    `special_tokens_mask` marks [CLS]/[SEP]/[PAD] (of the unmasked ids): with `labels` it gives the
    share of real tokens that are MLM targets, the masking contract made visible."""
    if not rows:
        raise ValueError("collate: empty batch")
    if settings.masking == "dynamic" and generator is None:
        raise ValueError("collate: dynamic masking needs a torch.Generator (seeded by the trainer)")
    width = max(len(r["input_ids"]) for r in rows)
    batch = len(rows)
    input_ids = torch.full((batch, width), settings.pad_id, dtype=torch.long)
    token_type_ids = torch.zeros((batch, width), dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    special = torch.ones((batch, width), dtype=torch.bool)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    special_ids = torch.tensor(sorted(settings.special_ids), dtype=torch.long)
    for i, row in enumerate(rows):
        ids = torch.as_tensor(row["input_ids"], dtype=torch.long)
        special[i, :len(ids)] = torch.isin(ids, special_ids)
        if settings.masking == "dynamic":
            ids, row_labels = _dynamic_mask(ids, settings, generator)  # type: ignore[arg-type]
        else:
            row_labels = _static_labels(ids, row["masked_lm_positions"], row["masked_lm_ids"])
        n = len(ids)
        input_ids[i, :n] = ids
        token_type_ids[i, :n] = torch.as_tensor(row["token_type_ids"], dtype=torch.long)
        attention_mask[i, :n] = 1
        labels[i, :n] = row_labels
    nsp = torch.as_tensor([int(r["next_sentence_label"]) for r in rows], dtype=torch.long)
    return {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask,
            "labels": labels, "next_sentence_label": nsp, "special_tokens_mask": special}


def mlm_counts(batch: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    """(MLM targets, non-special tokens) of a collated batch."""
    return int((batch["labels"] != IGNORE_INDEX).sum()), int((~batch["special_tokens_mask"]).sum())
