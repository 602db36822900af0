"""The two halves of the preprocess job that run on Ray workers: reading shards and processing them."""
from __future__ import annotations

import json
import logging
import os
from typing import Iterator, Optional

import pyarrow as pa

from pipelines.data.config import PreprocessConfig
from pipelines.data.documents import RawDocument, ReadPosition, SkipCounter
from pipelines.data.shard import SPLITS, process_shard
from pipelines.data.sources import ReadUnit, iter_items
from pipelines.data.tokenizer import EncoderSpec
from pipelines.atomic import file_sha256, write_parquet_atomic
from workers.log_files import OutputRedirect, worker_log
from workers.run_layout import RunLayout
from workers.run_records import ShardInfo, ShardRecord, dump_record, read_record, write_record
from workers.stall_watchdog import StallWatchdog

logger = logging.getLogger("pofa.preprocess")

# One tokenizer thread per processor: the processors are the parallelism. Set by the processor itself, not
# by a runtime_env: an actor with its own env_vars cannot use an idle worker process Ray has started
# already and waits for a new one to boot (seconds of a shared CPU). The process ends with the actor.
_PROCESSOR_ENV = {"RAYON_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def shard_id(file: int, window: int, chunk: int) -> str:
    """Fixed by the data: the file, the window of it the documents begin in, the run of
    `documents_per_shard` documents within that window. Sorted, the ids follow the source's order."""
    return f"{file:05d}-{window:07d}-{chunk:05d}"


def unit_batch(units: list[ReadUnit]) -> dict[str, list[str]]:
    """The rows `read_shards` takes: one serialized read unit each."""
    return {"unit": [u.to_json() for u in units]}


def read_shards(batch: dict, cfg_json: str) -> Iterator[pa.Table]:
    """Cut each read unit's documents into shards: per window, runs of `documents_per_shard` consecutive
    documents, one row each. The windows, not the units, decide the shards, so the rows are the same
    however the source was cut into units.

    Documents the reader itself skips (redirects, other namespaces, malformed records) are attributed to
    the shard of their window that follows them, so the counts do not depend on scheduling.
    """
    cfg = PreprocessConfig.model_validate_json(cfg_json)
    for text in batch["unit"]:
        unit = ReadUnit.from_json(str(text))
        skipped = SkipCounter()
        position = ReadPosition()
        docs: list[RawDocument] = []
        window: int | None = None
        chunk, start, n = 0, 0.0, 0
        limit = cfg.source.max_documents  # a capped file is one unit: the first documents of the file
        for at, item in iter_items(cfg.source, unit, position):
            if at != window:
                if window is not None and (docs or skipped):
                    yield _shard_row(unit, window, chunk, docs, skipped, (start, position.fraction))
                    start = position.fraction
                window, docs, chunk = at, [], 0
                skipped.clear()
            if isinstance(item, str):
                skipped.skip(item)
                continue
            if limit is not None and n >= limit:
                break
            n += 1
            docs.append(item)
            if len(docs) == cfg.documents_per_shard:
                yield _shard_row(unit, window, chunk, docs, skipped, (start, position.fraction))
                docs, chunk, start = [], chunk + 1, position.fraction
                skipped.clear()
        if window is not None and (docs or skipped):
            yield _shard_row(unit, window, chunk, docs, skipped, (start, 1.0))


def _shard_row(unit: ReadUnit, window: int, chunk: int, docs: list[RawDocument], skipped: SkipCounter,
               read_span: tuple[float, float]) -> pa.Table:
    """`read_span`: the part of its unit (0 to 1) the shard was read from, for progress only."""
    return pa.table({
        "shard_id": [shard_id(unit.file, window, chunk)],
        "unit": [unit.index],
        "doc_ids": [[d.doc_id for d in docs]],
        "titles": [[d.title for d in docs]],
        "texts": [[d.text for d in docs]],
        "markup": [[d.markup for d in docs]],
        "reader_skipped": [json.dumps(dict(skipped))],
        "read_span": [list(map(float, read_span))],
    })


class ShardProcessor:
    """An actor per worker: loads the tokenizer once, turns shard rows into Parquet files.

    A shard whose completion record exists (from an interrupted earlier attempt with the same
    fingerprint) is not redone: preprocessing full Wikipedia resumes at shard granularity. On an object
    store each shard's files are stored as soon as they are written, its completion record last.
    """

    def __init__(self, cfg_json: str, seed: int, layout: RunLayout, encoder: Optional[EncoderSpec] = None,
                 log_dir: Optional[str] = None, stall_timeout_s: Optional[float] = None):
        # the actor lives for this stage only: its output goes to the stage's log folder until it ends
        log = worker_log(log_dir, f"processor-{os.getpid()}")
        if log:
            OutputRedirect().switch(log)
        # a shard that makes no progress for stall_timeout_s: stacks to the log folder, the actor is
        # stopped, and Ray Data restarts it and retries the shard (waiting for shards is not watched)
        self.watchdog = (StallWatchdog(f"preprocess processor-{os.getpid()}", stall_timeout_s,
                                       log_dir or layout.stage_dir("preprocess"), log_path=log).start()
                         if stall_timeout_s else None)
        os.environ.update(_PROCESSOR_ENV)  # read by `tokenizers` when it first encodes
        self.cfg = PreprocessConfig.model_validate_json(cfg_json)
        self.seed = seed
        self.layout = layout
        if encoder is None:  # the run directory's tokenizer, trained on any node: this node's copy gets it
            from pipelines.data.tokenizer import load_tokenizer

            layout.pull(layout.tokenizer)
            encoder = EncoderSpec.of(load_tokenizer(layout.tokenizer))
        # The driver sends its tokenizer whole: a worker imports no `transformers` (and with it torch), which
        # takes seconds of a CPU it shares, and fetches nothing before it starts.
        self.tokenizer = encoder.load()
        if self.watchdog is not None:
            self.watchdog.idle()  # ready: waiting for the first shard

    def _finished(self, record_path: str) -> Optional[ShardRecord]:
        """The completion record of a shard whose files are all there with their recorded hashes; a
        shard that is missing or damaged (a full disk, a bad copy, a record that does not read as a
        ShardRecord) is made again instead."""
        try:
            record = read_record(ShardRecord, record_path, "preprocess")
            for split, shard in record.shards.items():
                path = self.layout.shard(split, shard.name)
                if not os.path.exists(path):
                    self.layout.pull(path)
                if not os.path.exists(path) or file_sha256(path) != shard.sha256:
                    raise ValueError(f"{path} is missing or differs from its record")
        except (OSError, ValueError) as exc:
            logger.warning("preprocess: shard %s is redone: %s", os.path.basename(record_path)[:-5], exc)
            os.unlink(record_path)
            return None
        return record

    def __call__(self, batch: pa.Table) -> pa.Table:
        try:
            results = [self._one(row) for row in batch.to_pylist()]
        finally:
            if self.watchdog is not None:
                self.watchdog.idle()
        return pa.table({"shard_id": [r.shard_id for r in results],
                         "result": [json.dumps(dump_record(r)) for r in results]})

    def _one(self, row: dict) -> ShardRecord:
        sid = row["shard_id"]
        if self.watchdog is not None:
            self.watchdog.beat(f"shard {sid}")
        record_path = self.layout.shard_record(sid)
        if not os.path.exists(record_path):
            self.layout.pull(record_path)  # done by an earlier attempt on another node?
        read_span = tuple(map(float, row.get("read_span") or (0.0, 0.0)))
        if os.path.exists(record_path):
            done = self._finished(record_path)
            if done is not None:  # found by its id, not by a listing; where it was read from is this run's
                return done.model_copy(update={"unit": row.get("unit"), "read_span": read_span})
        docs = [RawDocument(i, t, x, m) for i, t, x, m in zip(row["doc_ids"], row["titles"], row["texts"], row["markup"])]
        tables, stats = process_shard(docs, sid, self.cfg, self.seed, self.tokenizer)
        for reason, n in json.loads(row["reader_skipped"]).items():
            stats.skipped.skip(reason, n)
        shards: dict[str, ShardInfo] = {}
        written = []
        for split in SPLITS:
            if tables[split].num_rows:
                name = f"shard-{sid}.parquet"
                path = self.layout.shard(split, name)
                shards[split] = ShardInfo(name=name, rows=tables[split].num_rows,
                                          sha256=write_parquet_atomic(tables[split], path))
                written.append(path)
        record = ShardRecord(shard_id=sid, unit=row.get("unit"), stats=stats.as_dict(), shards=shards,
                             read_span=read_span)
        write_record(record, record_path)
        self.layout.push_files(written)  # the shard's files first, its completion record last
        self.layout.push_files([record_path])
        return record


def shard_results(table: pa.Table) -> list[ShardRecord]:
    """The records a ShardProcessor returned (its output table), for the driver."""
    return [shard_result(text) for text in table.column("result").to_pylist()]


def shard_result(text: str) -> ShardRecord:
    """One shard's record as a processor sent it (the JSON of its completion record)."""
    return ShardRecord.model_validate_json(text)
