"""Per-rank shards and the resumable data cursor (no cluster needed)."""
from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from tests.workers.train_fixture import make_preprocess
from workers.train.data import DataCursor, RankData, eval_batches, load_shard, plan_shard, total_rows


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


@pytest.fixture(scope="module")
def preprocess(tmp_path_factory):
    return make_preprocess(str(tmp_path_factory.mktemp("run")), n_train=101, n_val=9)


def test_each_rank_reads_exactly_its_rows(preprocess):
    train = f"{preprocess}/train"
    full = pq.read_table(train).column("input_ids").to_pylist()
    assert total_rows(train) == 101
    shards = [load_shard(train, r, 3) for r in range(3)]
    assert [len(s) for s in shards] == [33, 33, 33]
    got = [ids for s in shards for ids in s.column("input_ids").to_pylist()]
    assert got == full[:99]  # rank order = global order, the 2-row tail is dropped


def test_cursor_walks_epochs_without_repeats(preprocess):
    table = load_shard(f"{preprocess}/train", 0, 2)  # 50 rows
    data = RankData(table, samples_per_step=8, micro_batch_size=4, seed=1, rank=0)
    assert data.steps_per_epoch == 6
    cursor, seen = DataCursor(), []
    for _ in range(data.steps_per_epoch):
        batches = data.step_batches(cursor)
        assert [len(b) for b in batches] == [4, 4]
        seen += [tuple(r["input_ids"]) for b in batches for r in b]
        cursor = data.advance(cursor)
    assert cursor == DataCursor(epoch=1, position=0)
    assert len(set(seen)) == len(seen) == 48  # no sample twice in an epoch
    # a new epoch draws a new order; a fresh reader at the same cursor reads the same rows
    again = RankData(table, 8, 4, seed=1, rank=0)
    assert again.step_batches(cursor) == data.step_batches(cursor)
    assert data.step_batches(cursor) != data.step_batches(DataCursor())


def test_a_shard_smaller_than_a_step_is_refused(preprocess):
    with pytest.raises(ValueError, match="global_batch_size"):
        RankData(load_shard(f"{preprocess}/validation", 0, 2), 8, 4, seed=0, rank=0)


def test_eval_batches_are_a_fixed_prefix(preprocess):
    table = load_shard(f"{preprocess}/validation", 1, 2)  # 4 rows
    batches = list(eval_batches(table, micro_batch_size=3, max_batches=5))
    assert [len(b) for b in batches] == [3, 1]
    assert batches == list(eval_batches(table, 3, 5))
