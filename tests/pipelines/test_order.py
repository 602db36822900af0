"""The epoch order: a function of (seed, epoch) over the whole split, windows of row groups."""
from __future__ import annotations

import numpy as np
import pytest

from pipelines.data.order import EpochOrder

GROUPS = [37, 52, 11, 64, 29, 40, 33]  # rows per row group (one per shard), 266 rows


def test_every_epoch_visits_every_row_once_in_its_own_order():
    order = EpochOrder(GROUPS, seed=3, window_groups=2)
    first, second = order.rows_at(0, 0, order.rows), order.rows_at(1, 0, order.rows)
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(sum(GROUPS)))
    assert not np.array_equal(first, second)
    assert np.array_equal(first, EpochOrder(GROUPS, seed=3, window_groups=2).rows_at(0, 0, order.rows))
    assert not np.array_equal(first, EpochOrder(GROUPS, seed=4, window_groups=2).rows_at(0, 0, order.rows))


def test_a_window_holds_only_its_row_groups_and_any_slice_reads_only_its_windows():
    order = EpochOrder(GROUPS, seed=0, window_groups=3)
    for position in (0, 100, 200, 265):
        window = order.window_at(0, position)
        groups, _ = order.locate(window.rows)
        assert set(groups.tolist()) == set(window.groups) and len(window.groups) <= 3
    # a slice across a window boundary: the rows, in order, and the row groups both windows hold
    boundary = order.window_at(0, 0).stop
    rows = order.rows_at(0, boundary - 5, boundary + 5)
    assert np.array_equal(rows, order.rows_at(0, 0, order.rows)[boundary - 5:boundary + 5])
    assert set(order.locate(rows)[0].tolist()) <= set(order.groups_at(0, boundary - 5, boundary + 5))


def test_positions_per_epoch_leave_out_the_short_tail_and_bad_input_is_named():
    assert EpochOrder(GROUPS, 0).positions_per_epoch(32) == 256
    with pytest.raises(ValueError, match="no rows"):
        EpochOrder([0, 0], 0)
    with pytest.raises(ValueError, match="window_groups"):
        EpochOrder(GROUPS, 0, window_groups=0)
