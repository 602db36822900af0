"""Batch the preprocessed Parquet rows for MLM + NSP, straight from Arrow columns: padding, attention
masks, MLM labels, with no per-row Python objects.

Dynamic masking happens here at batch time (15%, 80% [MASK] / 10% random / 10% unchanged). Every
random draw is a counter-based hash of the sample's key and the token position: the masks of a
sample depend on which sample it is (the trainer keys it by seed, epoch and position in the epoch's
order), never on which rank or micro-batch reads it, so a run resumed on another number of workers
draws exactly the same masks. Static data already carries its masks: only labels are built from them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

IGNORE_INDEX = -100  # labels torch's cross-entropy ignores: every loss and metric of pofa reads this one
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


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


def mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer, elementwise on uint64: a well-spread hash of a counter."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def sample_keys(seed: int, stream: int, positions: np.ndarray) -> np.ndarray:
    """One key per sample from (seed, stream, position): e.g. stream = the epoch, position = the
    sample's place in that epoch's order."""
    with np.errstate(over="ignore"):
        base = mix(np.array([(seed << 20) ^ stream], dtype=np.uint64))[0]
        return mix(np.asarray(positions, dtype=np.uint64) * _GOLDEN + base)


def _draws(keys: np.ndarray, width: int, purpose: int) -> np.ndarray:
    """uint64 draws per (sample, position), independent across purposes."""
    with np.errstate(over="ignore"):
        cols = np.arange(width, dtype=np.uint64) * np.uint64(4) + np.uint64(purpose)
        return mix(keys[:, None] ^ mix(cols + _GOLDEN)[None, :])


def _uniform(keys: np.ndarray, width: int, purpose: int) -> np.ndarray:
    return (_draws(keys, width, purpose) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def num_predictions(length: np.ndarray, candidates: np.ndarray, settings: CollatorSettings) -> np.ndarray:
    """BERT's rule, per row: min(cap, max(1, round(length x p)), candidates) (round half to even, as
    Python's round in the reference script)."""
    wanted = np.maximum(1, np.round(length * settings.masked_lm_prob).astype(np.int64))
    return np.minimum(np.minimum(settings.max_predictions_per_seq, wanted), candidates)


def _padded(column: pa.ChunkedArray | pa.Array, width: int, fill: int) -> tuple[np.ndarray, np.ndarray]:
    """A list column as a [rows, width] int64 array (padded with `fill`) and the rows' lengths."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    lengths = pc.list_value_length(array).to_numpy(zero_copy_only=False).astype(np.int64)
    values = pc.list_flatten(array).to_numpy(zero_copy_only=False).astype(np.int64)
    out = np.full((len(lengths), width), fill, dtype=np.int64)
    out[np.arange(width)[None, :] < lengths[:, None]] = values  # row-major, as the values are stored
    return out, lengths


def _dynamic_mask(ids: np.ndarray, real: np.ndarray, lengths: np.ndarray, settings: CollatorSettings,
                  keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    specials = np.fromiter(settings.special_ids, dtype=np.int64)
    candidate = real & ~np.isin(ids, specials)
    n = num_predictions(lengths, candidate.sum(1), settings)
    order = np.where(candidate, _uniform(keys, ids.shape[1], 0), np.inf)
    rank = np.argsort(np.argsort(order, axis=1, kind="stable"), axis=1, kind="stable")
    chosen = rank < n[:, None]
    action = _uniform(keys, ids.shape[1], 1)
    random_tokens = (_draws(keys, ids.shape[1], 2) % np.uint64(settings.vocab_size)).astype(np.int64)
    masked = np.where(chosen & (action < 0.8), settings.mask_id,
                      np.where(chosen & (action < 0.9), random_tokens, ids))
    return masked, np.where(chosen, ids, IGNORE_INDEX)


def _static_labels(table: pa.Table, ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    positions = table.column("masked_lm_positions").combine_chunks()
    originals = table.column("masked_lm_ids").combine_chunks()
    counts = pc.list_value_length(positions).to_numpy(zero_copy_only=False)
    if not np.array_equal(counts, pc.list_value_length(originals).to_numpy(zero_copy_only=False)):
        row = int(np.nonzero(counts != pc.list_value_length(originals).to_numpy(zero_copy_only=False))[0][0])
        raise ValueError(f"row {row}: masked_lm_positions and masked_lm_ids differ in length")
    rows = np.repeat(np.arange(len(counts)), counts)
    pos = pc.list_flatten(positions).to_numpy(zero_copy_only=False).astype(np.int64)
    bad = (pos < 0) | (pos >= lengths[rows])
    if bad.any():
        row = int(rows[np.nonzero(bad)[0][0]])
        raise ValueError(f"row {row}: masked_lm_positions point outside input_ids of length {int(lengths[row])}")
    labels = np.full(ids.shape, IGNORE_INDEX, dtype=np.int64)
    labels[rows, pos] = pc.list_flatten(originals).to_numpy(zero_copy_only=False).astype(np.int64)
    return labels


def collate(table: pa.Table, settings: CollatorSettings, keys: np.ndarray | None = None) -> dict[str, torch.Tensor]:
    """Model inputs with MLM and NSP labels for the rows of `table` (the Parquet columns). `keys`: one
    uint64 per row (`sample_keys`), needed by dynamic masking. `special_tokens_mask` marks
    [CLS]/[SEP]/[PAD] of the unmasked ids: with `labels` it gives the share of real tokens that are
    MLM targets, the masking contract made visible."""
    if table.num_rows == 0:
        raise ValueError("collate: empty batch")
    lengths = pc.list_value_length(table.column("input_ids").combine_chunks()).to_numpy(zero_copy_only=False)
    width = int(lengths.max())
    ids, lengths = _padded(table.column("input_ids"), width, settings.pad_id)
    types, _ = _padded(table.column("token_type_ids"), width, 0)
    real = np.arange(width)[None, :] < lengths[:, None]
    special = ~real | np.isin(ids, np.fromiter(settings.special_ids, dtype=np.int64))
    if settings.masking == "dynamic":
        if keys is None or len(keys) != table.num_rows:
            raise ValueError("collate: dynamic masking needs one sample key per row (seeded by the trainer)")
        masked, labels = _dynamic_mask(ids, real, lengths, settings, np.asarray(keys, dtype=np.uint64))
    else:
        masked, labels = ids, _static_labels(table, ids, lengths)
    nsp = table.column("next_sentence_label").to_numpy().astype(np.int64)
    return {"input_ids": torch.from_numpy(masked), "token_type_ids": torch.from_numpy(types),
            "attention_mask": torch.from_numpy(real.astype(np.int64)), "labels": torch.from_numpy(labels),
            "next_sentence_label": torch.from_numpy(nsp), "special_tokens_mask": torch.from_numpy(special)}


def mlm_counts(batch: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    """(MLM targets, non-special tokens) of a collated batch."""
    return int((batch["labels"] != IGNORE_INDEX).sum()), int((~batch["special_tokens_mask"]).sum())
