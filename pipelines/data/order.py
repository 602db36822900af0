"""The order in which an epoch visits the training split: a function of (seed, epoch) over the whole
split, whatever the number of workers.

The split is the concatenation of its shards' row groups, in the order the preprocess record lists
them (row i of the split is "global row" i). An epoch

1. shuffles the row groups (seeded by seed and epoch);
2. cuts that sequence into windows of `window_groups` consecutive row groups;
3. shuffles the rows inside each window (seeded by seed, epoch and window).

So a reader holds at most one window of row groups at a time (memory bounded by the window, not the
corpus), and every sample is as likely to land anywhere in its window. Position p of the epoch is
one global row; global batch k is positions [k*G, (k+1)*G), each rank takes its slice of it; the
short tail of an epoch (fewer than G positions) is left out. Nothing here depends on who reads.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from functools import lru_cache

import numpy as np


@dataclass(frozen=True)
class Window:
    groups: tuple[int, ...]  # row-group indices, in this epoch's order
    start: int  # first epoch position it covers
    rows: np.ndarray  # global row of each of its positions, in order

    @property
    def stop(self) -> int:
        return self.start + len(self.rows)


class EpochOrder:
    """`group_rows`: the row count of every row group of the split, in split order."""

    def __init__(self, group_rows: list[int], seed: int, window_groups: int = 4) -> None:
        if not group_rows or sum(group_rows) == 0:
            raise ValueError("the training split has no rows")
        if window_groups < 1:
            raise ValueError(f"window_groups={window_groups}: expected >= 1")
        self.group_rows = np.asarray(group_rows, dtype=np.int64)
        self.group_start = np.concatenate([[0], np.cumsum(self.group_rows)[:-1]])
        self.seed, self.window_groups = seed, window_groups
        self.rows = int(self.group_rows.sum())
        self._windows = lru_cache(maxsize=4)(self._window)

    def positions_per_epoch(self, global_batch: int) -> int:
        return self.rows // global_batch * global_batch

    def _plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(the epoch's row-group order, the first position of each window)."""
        order = np.random.default_rng([self.seed, epoch, 0]).permutation(len(self.group_rows))
        sizes = [int(self.group_rows[order[i:i + self.window_groups]].sum())
                 for i in range(0, len(order), self.window_groups)]
        return order, np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)

    def _window(self, epoch: int, index: int) -> Window:
        order, starts = self._plan(epoch)
        groups = order[index * self.window_groups:(index + 1) * self.window_groups]
        rows = np.concatenate([np.arange(self.group_start[g], self.group_start[g] + self.group_rows[g]) for g in groups])
        shuffled = rows[np.random.default_rng([self.seed, epoch, 1, index]).permutation(len(rows))]
        return Window(tuple(int(g) for g in groups), int(starts[index]), shuffled)

    def window_at(self, epoch: int, position: int) -> Window:
        _, starts = self._plan(epoch)
        return self._windows(epoch, bisect.bisect_right(starts.tolist(), position) - 1)

    def rows_at(self, epoch: int, start: int, stop: int) -> np.ndarray:
        """Global rows of epoch positions [start, stop), in order (they may span two windows)."""
        out = []
        while start < stop:
            window = self.window_at(epoch, start)
            end = min(stop, window.stop)
            out.append(window.rows[start - window.start:end - window.start])
            start = end
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def groups_at(self, epoch: int, start: int, stop: int) -> list[int]:
        """The row groups positions [start, stop) read, in the order first needed."""
        found: list[int] = []
        while start < stop:
            window = self.window_at(epoch, start)
            found += [g for g in window.groups if g not in found]
            start = window.stop
        return found

    def locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row group, row inside it) of each global row."""
        group = np.searchsorted(self.group_start, rows, side="right") - 1
        return group, rows - self.group_start[group]
