"""Padding, labels and batch-time masking of the pretraining collator, from Arrow columns."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipelines.data.collator import IGNORE_INDEX, CollatorSettings, num_predictions, sample_keys
from pipelines.data.collator import collate as collate_table
from pipelines.data.shard import SCHEMA

PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
SETTINGS = CollatorSettings(pad_id=PAD, mask_id=MASK, vocab_size=100, special_ids=frozenset({PAD, UNK, CLS, SEP, MASK}),
                            masking="dynamic", masked_lm_prob=0.15, max_predictions_per_seq=5)


def row(n_a: int, n_b: int, nsp: int = 0, start: int = 10) -> dict:
    ids = [CLS] + list(range(start, start + n_a)) + [SEP] + list(range(start + 40, start + 40 + n_b)) + [SEP]
    return {"input_ids": ids, "token_type_ids": [0] * (n_a + 2) + [1] * (n_b + 1), "next_sentence_label": nsp,
            "masked_lm_positions": [], "masked_lm_ids": []}


def gen(seed: int) -> int:
    return seed


def collate(rows: list[dict], settings: CollatorSettings, seed: int | None = None) -> dict[str, torch.Tensor]:
    """The rows as the Parquet shards hold them; sample keys from (seed, position) as the trainer does."""
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    keys = None if seed is None else sample_keys(seed, 0, np.arange(len(rows)))
    return collate_table(table, settings, keys)


def test_pads_to_the_longest_row_with_masks_and_labels():
    rows = [row(3, 2, nsp=1), row(10, 12, nsp=0)]
    batch = collate(rows, SETTINGS, gen(0))
    assert batch["input_ids"].shape == (2, 25)
    assert batch["attention_mask"][0].tolist() == [1] * 8 + [0] * 17
    assert (batch["input_ids"][0, 8:] == PAD).all()
    assert batch["token_type_ids"][1, :12].eq(0).all() and batch["token_type_ids"][1, 12:25].eq(1).all()
    assert batch["next_sentence_label"].tolist() == [1, 0]
    assert (batch["labels"][0, 8:] == IGNORE_INDEX).all()  # never on padding


def test_dynamic_masking_counts_and_positions():
    rows = [row(10, 12, start=10 + i) for i in range(8)]
    batch = collate(rows, SETTINGS, gen(1))
    for i, r in enumerate(rows):
        original = torch.tensor(r["input_ids"])
        labels = batch["labels"][i, :len(original)]
        chosen = labels != IGNORE_INDEX
        n = num_predictions(np.array([len(original)]), np.array([len(original) - 3]), SETTINGS)
        assert int(chosen.sum()) == int(n[0]) == 4
        assert torch.equal(labels[chosen], original[chosen])  # labels are the original tokens
        assert not any(int(t) in SETTINGS.special_ids for t in original[chosen])  # specials never chosen
        unchanged = batch["input_ids"][i, :len(original)][~chosen]
        assert torch.equal(unchanged, original[~chosen])  # only chosen positions may change


def test_max_predictions_caps_long_rows():
    settings = CollatorSettings(**{**SETTINGS.__dict__, "max_predictions_per_seq": 3})
    batch = collate([row(60, 60)], settings, gen(0))
    assert int((batch["labels"] != IGNORE_INDEX).sum()) == 3


def test_80_10_10_replacement():
    rows = [row(30, 30, start=5 + i % 20) for i in range(400)]
    settings = CollatorSettings(**{**SETTINGS.__dict__, "max_predictions_per_seq": 20})
    batch = collate(rows, settings, gen(2))
    chosen = batch["labels"] != IGNORE_INDEX
    masked = (batch["input_ids"] == MASK) & chosen
    kept = (batch["input_ids"] == batch["labels"]) & chosen
    total = int(chosen.sum())
    assert total > 3000
    assert 0.77 < int(masked.sum()) / total < 0.83
    # "random" can draw the original token by chance (1/100), so kept is slightly above 10%
    assert 0.08 < int(kept.sum()) / total < 0.13


def test_same_keys_same_masks_whatever_batch_a_sample_is_in():
    rows = [row(10, 12, start=10 + i) for i in range(4)]
    a, b, c = collate(rows, SETTINGS, gen(7)), collate(rows, SETTINGS, gen(7)), collate(rows, SETTINGS, gen(8))
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    assert not torch.equal(a["labels"], c["labels"])
    # a sample's masks follow its key: split into two batches (as with more workers), the same masks
    keys = sample_keys(7, 0, np.arange(4))
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    halves = [collate_table(table.slice(i, 2), SETTINGS, keys[i:i + 2]) for i in (0, 2)]
    width = a["labels"].shape[1]
    for i, half in enumerate(halves):
        assert torch.equal(half["labels"], a["labels"][2 * i:2 * i + 2, :half["labels"].shape[1]])
        assert (a["labels"][2 * i:2 * i + 2, half["labels"].shape[1]:width] == IGNORE_INDEX).all()


def test_static_masking_uses_the_stored_positions():
    settings = CollatorSettings(**{**SETTINGS.__dict__, "masking": "static"})
    r = row(5, 5)
    r["input_ids"][2] = MASK
    r["masked_lm_positions"], r["masked_lm_ids"] = [2, 7], [11, 50]
    batch = collate([r, row(3, 3)], settings)  # no generator needed
    assert batch["input_ids"][0].tolist()[:len(r["input_ids"])] == r["input_ids"]  # inputs untouched
    labels = batch["labels"][0]
    assert labels[2] == 11 and labels[7] == 50
    assert int((labels != IGNORE_INDEX).sum()) == 2
    assert (batch["labels"][1] == IGNORE_INDEX).all()


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="sample key"):
        collate([row(3, 3)], SETTINGS)
    with pytest.raises(ValueError, match="empty"):
        collate([], SETTINGS, gen(0))
    outside = row(3, 3)
    outside["masked_lm_positions"], outside["masked_lm_ids"] = [40], [5]
    with pytest.raises(ValueError, match="outside input_ids"):
        collate([outside], CollatorSettings(**{**SETTINGS.__dict__, "masking": "static"}))
    bad = row(3, 3)
    bad["masked_lm_positions"], bad["masked_lm_ids"] = [1, 2], [5]
    with pytest.raises(ValueError, match="differ"):
        collate([bad], CollatorSettings(**{**SETTINGS.__dict__, "masking": "static"}))
    with pytest.raises(ValueError, match="masking"):
        CollatorSettings(**{**SETTINGS.__dict__, "masking": "sometimes"})
