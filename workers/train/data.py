"""Per-rank shares of a small table (a fine-tuning task's features), with a resumable cursor.

Rank r owns the contiguous rows [r*n, (r+1)*n) with n = total // world_size: every rank gets the
same number of samples and reads only the row groups that hold its rows. Within its share a rank
walks an epoch-seeded permutation; the cursor (epoch, position) is saved in checkpoints so a resumed
run neither repeats nor skips a sample. (Pretraining streams its corpus in a global order instead:
`streaming.py`.)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

def plan_shard(counts: list[int], rank: int, world_size: int) -> list[tuple[int, int, int]]:
    """(file index, first row, end row) pieces holding rank's rows of the global row space."""
    per_rank = sum(counts) // world_size
    lo, hi = rank * per_rank, (rank + 1) * per_rank
    pieces, offset = [], 0
    for i, n in enumerate(counts):
        start, stop = max(lo, offset), min(hi, offset + n)
        if start < stop:
            pieces.append((i, start - offset, stop - offset))
        offset += n
    return pieces


def read_rows(path: str, start: int, stop: int, columns: tuple[str, ...] | None = None) -> pa.Table:
    """Rows [start, stop) of one file, reading only the row groups that overlap them (None: all columns)."""
    pf = pq.ParquetFile(path)
    groups, first_row, row = [], None, 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if row < stop and row + n > start:
            groups.append(g)
            first_row = row if first_row is None else first_row
        row += n
    table = pf.read_row_groups(groups, columns=list(columns) if columns is not None else None)
    return table.slice(start - (first_row or 0), stop - start)


@dataclass(frozen=True)
class DataCursor:
    """Where the next optimizer step reads: epoch and position in that epoch's permutation."""

    epoch: int = 0
    position: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class RankData:
    """A rank's training shard; one optimizer step reads `samples_per_step` rows from the cursor."""

    def __init__(self, table: pa.Table, samples_per_step: int, micro_batch_size: int, seed: int, rank: int):
        if len(table) < samples_per_step:
            raise ValueError(f"rank {rank} has {len(table)} training rows but one step needs {samples_per_step}: "
                             "lower training.global_batch_size or preprocess more data")
        self.table = table
        self.samples_per_step = samples_per_step
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.rank = rank
        self._order: tuple[int, np.ndarray] | None = None

    @property
    def steps_per_epoch(self) -> int:
        return len(self.table) // self.samples_per_step

    def permutation(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch, self.rank])
            self._order = (epoch, rng.permutation(len(self.table)))
        return self._order[1]

    def advance(self, cursor: DataCursor) -> DataCursor:
        position = cursor.position + self.samples_per_step
        if position + self.samples_per_step > len(self.table):  # drop the epoch's short tail
            return DataCursor(cursor.epoch + 1, 0)
        return DataCursor(cursor.epoch, position)

    def step_batches(self, cursor: DataCursor) -> list[list[dict]]:
        """The micro-batches (lists of row dicts) of the step at `cursor`."""
        if cursor.position + self.samples_per_step > len(self.table):
            raise ValueError(f"data cursor {cursor} is past the end of rank {self.rank}'s shard ({len(self.table)} rows)")
        idx = self.permutation(cursor.epoch)[cursor.position:cursor.position + self.samples_per_step]
        rows = self.table.take(pa.array(idx)).to_pylist()
        m = self.micro_batch_size
        return [rows[i:i + m] for i in range(0, len(rows), m)]
