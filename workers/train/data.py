"""Per-rank shards of the preprocessed Parquet data, with a resumable cursor.

The global row space is the concatenation of the split's shards in the order the preprocess
record lists them. Rank r owns the
contiguous rows [r*n, (r+1)*n) with n = total // world_size: every rank gets the same number of
samples (unequal shards hurt BERT pretraining) and reads only the row groups that hold its rows.
Within its shard a rank walks an epoch-seeded permutation; the cursor (epoch, position) is saved
in checkpoints so a resumed run neither repeats nor skips a sample.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

COLUMNS = ("input_ids", "token_type_ids", "next_sentence_label", "masked_lm_positions", "masked_lm_ids")


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


def read_rows(path: str, start: int, stop: int, columns: tuple[str, ...] | None = COLUMNS) -> pa.Table:
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


def load_rows(files: list[str], pieces: list[tuple[int, int, int]]) -> pa.Table:
    """The rows `plan_shard` gave a rank, from the row groups that hold them only."""
    if not pieces:
        return pa.table({c: pa.array([], type=pa.int32()) for c in COLUMNS}).slice(0, 0)
    return pa.concat_tables([read_rows(files[i], a, b) for i, a, b in pieces]).combine_chunks()


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


def eval_batches(table: pa.Table, micro_batch_size: int, max_batches: int) -> Iterator[list[dict]]:
    """The first `max_batches` micro-batches of a rank's validation shard, in stored order."""
    limit = min(len(table), micro_batch_size * max_batches)
    for start in range(0, limit, micro_batch_size):
        yield table.slice(start, min(micro_batch_size, limit - start)).to_pylist()
