"""The pretraining data path: the training split streamed in the global epoch order, each rank taking
its slice of every global batch, built into tensors straight from Arrow columns.

Why not Ray Data: `iter_torch_batches` streams well, but open-source Ray Data gives no exact
mid-epoch resume and no order that is the same on any number of workers (it does not preserve order
by default, and a split's rows depend on the number of consumers); pofa needs both to resume a
stage step-exactly on another worker count. So this reader is pofa's own, on pyarrow:

- order: `pipelines.data.order.EpochOrder` (shuffled row groups, then a shuffle inside windows of
  `window_groups` row groups), a function of (seed, epoch) over the whole split;
- global batch k = epoch positions [k*G, (k+1)*G); rank r of N reads [k*G + r*G/N, k*G + (r+1)*G/N);
- memory: the row groups of the windows in use (the preprocess stage writes one row group per shard),
  only the columns training reads; the next step's row groups load in a background thread;
- storage: a shard file is brought to this node (on an object-store run) when first needed: the
  driver never needs the corpus on its disk, a node only the shards it reads;
- masks: keyed by (seed, epoch, position), so a sample draws the same masks on any rank.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipelines.data.collator import CollatorSettings, collate, mix, sample_keys
from pipelines.data.order import EpochOrder
from workers.run_layout import RunLayout
from workers.stage_outputs import PreprocessOutput

VALIDATION_STREAM = 1 << 30  # the key stream of validation samples: apart from every epoch's
# Validation masks (dynamic masking) do not depend on the run's seed: the teacher and every student
# trained on the same data are scored on the same masked tokens, so their val/* metrics compare.
VALIDATION_SEED = 0
_DYNAMIC_COLUMNS = ["input_ids", "token_type_ids", "next_sentence_label"]
_STATIC_COLUMNS = _DYNAMIC_COLUMNS + ["masked_lm_positions", "masked_lm_ids"]


@dataclass(frozen=True)
class GlobalCursor:
    """Where the next global batch starts: an epoch and a position in that epoch's order. The same on
    every rank and for every worker count."""

    epoch: int = 0
    position: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class ShardFiles:
    """A split's shard files (one row group each), read on first need, columns as training needs them."""

    def __init__(self, layout: RunLayout, record: PreprocessOutput, split: str, static: bool) -> None:
        self.layout = layout
        self.paths = [layout.shard(split, s.name) for s in record.splits[split].shards]  # type: ignore[index]
        self.rows = [s.rows for s in record.splits[split].shards]  # type: ignore[index]
        self.columns = _STATIC_COLUMNS if static else _DYNAMIC_COLUMNS

    def read(self, index: int) -> pa.Table:
        path = self.paths[index]
        self.layout.pull(path)  # an object-store run: this node gets the shard when it first reads it
        # one thread (the prefetch thread is the parallelism), no read-ahead buffers: the memory a rank
        # holds stays the row groups in use (`make bench-data` measures it)
        table = pq.read_table(path, columns=self.columns, use_threads=False, pre_buffer=False)
        if table.num_rows != self.rows[index]:
            raise ValueError(f"{path} has {table.num_rows} rows, the preprocess record {self.rows[index]}: redo the "
                             "preprocess stage")
        return table.combine_chunks()


class StreamingBatches:
    """One rank's stream of micro-batches of the training split."""

    def __init__(self, layout: RunLayout, record: PreprocessOutput, settings: CollatorSettings, seed: int,
                 rank: int, world: int, global_batch: int, micro_batch: int, window_groups: int = 4) -> None:
        if global_batch % world or (global_batch // world) % micro_batch:
            raise ValueError(f"global_batch_size={global_batch} does not split into {world} workers x "
                             f"micro_batch_size={micro_batch}")
        self.settings, self.seed, self.rank, self.world = settings, seed, rank, world
        self.global_batch, self.per_rank, self.micro = global_batch, global_batch // world, micro_batch
        self.files = ShardFiles(layout, record, "train", settings.masking == "static")
        self.order = EpochOrder(self.files.rows, seed, window_groups)
        self.per_epoch = self.order.positions_per_epoch(global_batch)
        if self.per_epoch == 0:
            raise ValueError(f"the train split has {self.order.rows} rows: fewer than one global batch "
                             f"({global_batch})")
        self._tables: dict[int, pa.Table] = {}
        self._loading: dict[int, Future] = {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="pofa-prefetch")

    @property
    def steps_per_epoch(self) -> int:
        return self.per_epoch // self.global_batch

    def advance(self, cursor: GlobalCursor) -> GlobalCursor:
        position = cursor.position + self.global_batch
        if position + self.global_batch > self.per_epoch:  # the epoch's short tail is left out
            return GlobalCursor(cursor.epoch + 1, 0)
        return GlobalCursor(cursor.epoch, position)

    def global_rows(self, cursor: GlobalCursor) -> np.ndarray:
        """The split rows of the whole global batch at `cursor` (the same whatever the worker count)."""
        return self.order.rows_at(cursor.epoch, cursor.position, cursor.position + self.global_batch)

    def step_batches(self, cursor: GlobalCursor) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches of the global batch at `cursor`, as model inputs."""
        if cursor.position + self.global_batch > self.per_epoch:
            raise ValueError(f"data cursor {cursor} is past the end of the epoch ({self.per_epoch} positions)")
        start = cursor.position + self.rank * self.per_rank
        positions = np.arange(start, start + self.per_rank)
        table = self._rows(cursor.epoch, positions)
        self._prefetch(self.advance(cursor))
        keys = sample_keys(self.seed, cursor.epoch, positions)
        return [collate(table.slice(i, self.micro), self.settings, keys[i:i + self.micro])
                for i in range(0, self.per_rank, self.micro)]

    # -- row groups ------------------------------------------------------------------------------
    def _rows(self, epoch: int, positions: np.ndarray) -> pa.Table:
        rows = self.order.rows_at(epoch, int(positions[0]), int(positions[-1]) + 1)
        groups, inner = self.order.locate(rows)
        needed = self.order.groups_at(epoch, int(positions[0]), int(positions[-1]) + 1)
        for g in needed:
            self._table(g)
        for g in [g for g in self._tables if g not in needed and g not in self._loading]:
            del self._tables[g]  # memory stays bounded by the windows in use
        parts, order = [], np.empty(len(rows), dtype=np.int64)
        offset = 0
        for g in np.unique(groups):
            picked = np.nonzero(groups == g)[0]
            parts.append(self._tables[int(g)].take(pa.array(inner[picked])))
            order[picked] = np.arange(offset, offset + len(picked))
            offset += len(picked)
        return pa.concat_tables(parts).take(pa.array(order))

    def _table(self, group: int) -> pa.Table:
        if group not in self._tables:
            future = self._loading.pop(group, None)
            self._tables[group] = future.result() if future is not None else self.files.read(group)
        return self._tables[group]

    def _prefetch(self, cursor: GlobalCursor) -> None:
        start = cursor.position + self.rank * self.per_rank
        for g in self.order.groups_at(cursor.epoch, start, start + self.per_rank):
            if g not in self._tables and g not in self._loading:
                self._loading[g] = self._pool.submit(self.files.read, g)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class ValidationBatches:
    """The first `samples` rows of the validation split in stored order, split into contiguous rank
    shares: the same samples (and masks) whatever the worker count, so val/* metrics compare."""

    def __init__(self, layout: RunLayout, record: PreprocessOutput, settings: CollatorSettings, seed: int,
                 rank: int, world: int, samples: int, micro_batch: int) -> None:
        files = ShardFiles(layout, record, "validation", settings.masking == "static")
        total = min(samples, sum(files.rows))
        per_rank = -(-total // world)
        self.lo, self.hi = min(total, rank * per_rank), min(total, (rank + 1) * per_rank)
        self.passes = -(-per_rank // micro_batch)  # the same on every rank: ZeRO-3 gathers together
        self.micro, self.settings, self.seed = micro_batch, settings, seed
        tables, offset = [], 0
        for index, rows in enumerate(files.rows):
            if offset < self.hi and offset + rows > self.lo:
                table = files.read(index)
                tables.append(table.slice(max(0, self.lo - offset), min(rows, self.hi - offset) - max(0, self.lo - offset)))
            offset += rows
        self.table = pa.concat_tables(tables) if tables else None

    def batches(self) -> list[tuple[dict[str, torch.Tensor], bool]]:
        """(batch, real): a rank short of rows repeats a batch it discards, so all run the same passes."""
        out = []
        for i in range(self.passes):
            start = self.lo + i * self.micro
            if self.table is not None and start < self.hi:
                n = min(self.micro, self.hi - start)
                keys = sample_keys(self.seed, VALIDATION_STREAM, np.arange(start, start + n))
                out.append((collate(self.table.slice(start - self.lo, n), self.settings, keys), True))
            else:
                out.append((out[0][0] if out else self._filler(), False))
        return out

    def _filler(self) -> dict[str, torch.Tensor]:
        ids = pa.array([[0, 1, 0]], type=pa.list_(pa.int32()))
        table = pa.table({"input_ids": ids, "token_type_ids": pa.array([[0, 0, 0]], type=pa.list_(pa.int8())),
                          "next_sentence_label": pa.array([0], type=pa.int8()),
                          "masked_lm_positions": pa.array([[1]], type=pa.list_(pa.int32())),
                          "masked_lm_ids": pa.array([[1]], type=pa.list_(pa.int32()))})
        return collate(table, self.settings, sample_keys(self.seed, VALIDATION_STREAM, np.array([0])))


def batch_digest(rows: np.ndarray) -> int:
    """An order-free 52-bit digest of a set of split rows (exact in a float64 metric)."""
    return int(np.bitwise_xor.reduce(mix(np.asarray(rows, dtype=np.uint64) + np.uint64(1))) >> np.uint64(12))


def counts_of(batches: list[Mapping[str, torch.Tensor]]) -> torch.Tensor:
    """[MLM targets, real tokens, sequences] of a rank's micro-batches: summed over ranks they
    normalise the global batch's loss the same way on any number of workers."""
    from pipelines.data.collator import IGNORE_INDEX

    targets = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    return torch.tensor([targets, tokens, sum(len(b["labels"]) for b in batches)], dtype=torch.float64)
