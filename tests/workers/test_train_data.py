"""Per-rank shares of the preprocess stage's shards (read through its output record) and the
resumable data cursor (no cluster needed)."""
from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from tests.workers.train_fixture import make_preprocess
from workers.stage_outputs import PreprocessOutput, read_output
from workers.train.data import DataCursor, RankData, eval_batches, load_rows, plan_shard
from workers.train.inputs import split_files


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
def layout(tmp_path_factory):
    return make_preprocess(str(tmp_path_factory.mktemp("run")), documents=60)


def _share(layout, split: str, rank: int, world: int):
    files, counts = split_files(layout, read_output(layout, "preprocess", PreprocessOutput), split)
    return load_rows(files, plan_shard(counts, rank, world)), files, counts


def test_each_rank_reads_exactly_its_rows(layout):
    _, files, counts = _share(layout, "train", 0, 3)
    full = [ids for f in files for ids in pq.read_table(f).column("input_ids").to_pylist()]
    assert len(full) == sum(counts) == read_output(layout, "preprocess", PreprocessOutput).splits["train"].rows
    shares = [_share(layout, "train", r, 3)[0] for r in range(3)]
    per_rank = len(full) // 3
    assert [len(s) for s in shares] == [per_rank] * 3
    got = [ids for s in shares for ids in s.column("input_ids").to_pylist()]
    assert got == full[:3 * per_rank]  # rank order = global order, the short tail is dropped


def test_cursor_walks_epochs_without_repeats(layout):
    table = _share(layout, "train", 0, 2)[0]
    data = RankData(table, samples_per_step=8, micro_batch_size=4, seed=1, rank=0)
    assert data.steps_per_epoch == len(table) // 8
    cursor, seen = DataCursor(), []
    for _ in range(data.steps_per_epoch):
        batches = data.step_batches(cursor)
        assert [len(b) for b in batches] == [4, 4]
        seen += [r["input_ids"] for b in batches for r in b]
        cursor = data.advance(cursor)
    assert cursor == DataCursor(epoch=1, position=0)
    order = data.permutation(0)[:8 * data.steps_per_epoch]
    assert len(set(order.tolist())) == len(order)  # no row twice in an epoch
    assert seen == table.take(order).column("input_ids").to_pylist()
    # a new epoch draws a new order; a fresh reader at the same cursor reads the same rows
    again = RankData(table, 8, 4, seed=1, rank=0)
    assert again.step_batches(cursor) == data.step_batches(cursor)
    assert data.step_batches(cursor) != data.step_batches(DataCursor())


def test_a_shard_smaller_than_a_step_is_refused(layout):
    table = _share(layout, "validation", 0, 2)[0]
    with pytest.raises(ValueError, match="global_batch_size"):
        RankData(table, len(table) + 1, 1, seed=0, rank=0)


def test_eval_batches_are_a_fixed_prefix(layout):
    table = _share(layout, "validation", 1, 2)[0].slice(0, 4)
    batches = list(eval_batches(table, micro_batch_size=3, max_batches=5))
    assert [len(b) for b in batches] == [3, 1]
    assert batches == list(eval_batches(table, 3, 5))
