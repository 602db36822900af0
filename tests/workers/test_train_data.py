"""The fine-tuning data path: per-rank shares of a features table and its resumable cursor."""
from __future__ import annotations

import pyarrow as pa
import pytest

from workers.train.data import DataCursor, RankData, plan_shard


def test_plan_gives_equal_disjoint_ranges():
    counts = [10, 7, 13]  # 30 rows
    plans = [plan_shard(counts, r, 4) for r in range(4)]  # 7 rows each, 2 left over
    rows = []
    for plan in plans:
        mine = []
        offset_of = [0, 10, 17]
        for f, a, b in plan:
            mine += [offset_of[f] + i for i in range(a, b)]
        assert len(mine) == 7
        rows += mine
    assert sorted(rows) == list(range(28))


@pytest.fixture
def table() -> pa.Table:
    return pa.table({"input_ids": [[i, i + 1] for i in range(50)], "label": list(range(50))})


def test_cursor_walks_epochs_without_repeats(table):
    data = RankData(table, samples_per_step=8, micro_batch_size=4, seed=1, rank=0)
    assert data.steps_per_epoch == 6
    cursor, seen = DataCursor(), []
    for _ in range(data.steps_per_epoch):
        batches = data.step_batches(cursor)
        assert [len(b) for b in batches] == [4, 4]
        seen += [r["label"] for b in batches for r in b]
        cursor = data.advance(cursor)
    assert cursor == DataCursor(epoch=1, position=0)
    assert len(set(seen)) == len(seen) == 48  # no sample twice in an epoch
    # a new epoch draws a new order; a fresh reader at the same cursor reads the same rows
    again = RankData(table, 8, 4, seed=1, rank=0)
    assert again.step_batches(cursor) == data.step_batches(cursor)
    assert data.step_batches(cursor) != data.step_batches(DataCursor())


def test_a_shard_smaller_than_a_step_is_refused(table):
    with pytest.raises(ValueError, match="global_batch_size"):
        RankData(table.slice(0, 5), 8, 4, seed=0, rank=0)
