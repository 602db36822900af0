"""The preprocess stage on Ray Data: read units -> shards -> Parquet, streaming, one actor per worker.

Entry point: `run_preprocess(cfg, seed, layout)`; the caller has connected to Ray. Memory stays bounded:
the readers stream documents, each shard is one row in flight, and Ray Data backpressures the readers
when the processors fall behind.
"""
from __future__ import annotations

import logging
import os
import time
from collections import Counter
from typing import Any, Callable, Mapping, Optional

import ray

from pipelines.data.config import PreprocessConfig
from pipelines.data.documents import SkipCounter
from pipelines.data.shard import clean_document
from pipelines.data.sources import ReadUnit, iter_documents, read_units, unit_size
from pipelines.data.tokenizer import EncoderSpec, load_tokenizer, train_wordpiece
from pipelines.atomic import atomic_dir
from pipelines.data.masking import MaskingContract
from pipelines.data.shard import SPLITS
from workers.preprocess.tasks import ShardProcessor, read_shards, shard_result
from workers.run_layout import RunLayout
from workers.run_records import ShardInfo, ShardRecord
from workers.stage_outputs import PreprocessOutput


def _corpus_sample(cfg: PreprocessConfig):
    """The first `tokenizer.train_documents` cleaned documents, in read-unit order (deterministic)."""
    skipped = SkipCounter()
    n = 0
    for unit in read_units(cfg.source):
        for doc in iter_documents(cfg.source, unit, skipped):
            text = clean_document(doc, skipped)
            if text is not None:
                yield text
                n += 1
                if n >= cfg.tokenizer.train_documents:
                    return


@ray.remote(num_cpus=1, runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
def _train_tokenizer(cfg_json: str, layout: RunLayout) -> None:
    """Runs on any node; its files go to the store (the driver's copy fetches them), `tokenizer.json`
    last since its presence means done."""
    cfg = PreprocessConfig.model_validate_json(cfg_json)
    with atomic_dir(layout.tokenizer) as tmp:
        train_wordpiece(_corpus_sample(cfg), cfg.tokenizer.train_vocab_size, cfg.tokenizer.lowercase, tmp,
                        cfg.max_seq_length)
    names = sorted(os.listdir(layout.tokenizer), key=lambda n: n == "tokenizer.json")
    layout.push_files([os.path.join(layout.tokenizer, n) for n in names])


def prepare_tokenizer(cfg: PreprocessConfig, layout: RunLayout) -> None:
    """Put the tokenizer in the run directory, so the run needs nothing outside it to resume or train."""
    if os.path.exists(os.path.join(layout.tokenizer, "tokenizer.json")):
        return  # made by an interrupted attempt with the same fingerprint
    if cfg.tokenizer.trains:
        ray.get(_train_tokenizer.remote(cfg.model_dump_json(), layout))
        layout.pull(layout.tokenizer)
        return
    with atomic_dir(layout.tokenizer) as tmp:
        load_tokenizer(cfg.tokenizer.name).save_pretrained(tmp)
    layout.push(layout.tokenizer)


# on_progress(done, total, metrics): the source read so far and its size (bytes; dataset shards count 1)
Progress = Callable[[int, int, Mapping[str, float]], None]


class SourceProgress:
    """How much of the source the finished shards cover, in whatever order they finish: each shard
    record holds the part of its read unit it was read from, weighted by the unit's size."""

    def __init__(self, cfg: PreprocessConfig, units: list[ReadUnit]) -> None:
        self.sizes = {u.index: unit_size(cfg.source, u) for u in units}
        self.total = sum(self.sizes.values())
        self.by_bytes = 0.0 if cfg.source.kind == "hf_dataset" else 1.0
        self.done = 0.0
        self.shards = self.tokens = self.documents = 0
        self.started = time.monotonic()

    def add(self, record: ShardRecord) -> tuple[int, int, dict[str, float]]:
        # a record of an older pofa has no unit (its id's first part) and no read span ((0, 0): no progress)
        unit = int(record.shard_id.split("-")[0]) if record.unit is None else record.unit
        start, end = record.read_span
        self.done += self.sizes.get(unit, 0) * max(0.0, end - start)
        self.shards += 1
        self.tokens += record.stats.tokens
        self.documents += sum(record.stats.documents.values())
        elapsed = max(time.monotonic() - self.started, 1e-9)
        return min(int(self.done), self.total), self.total, {
            "shards": self.shards, "tokens": self.tokens, "documents": self.documents,
            "throughput/tokens_per_s": self.tokens / elapsed, "by_bytes": self.by_bytes}


def run_preprocess(cfg: PreprocessConfig, seed: int, layout: RunLayout, log_dir: Optional[str] = None,
                   on_progress: Optional[Progress] = None, stall_timeout_s: Optional[float] = None
                   ) -> tuple[dict[str, Any], dict[str, str], PreprocessOutput]:
    """Run the stage; returns (manifest statistics, output files relative to the stage folder -> sha256,
    the typed output record the training stages read). `log_dir`: each processor's output goes there;
    `on_progress` hears of every finished shard; `stall_timeout_s`: a processor stuck that long on a
    shard leaves its stacks in `log_dir` and is restarted (workers/stall_watchdog.py)."""
    prepare_tokenizer(cfg, layout)
    tokenizer = load_tokenizer(layout.tokenizer)
    cfg_json = cfg.model_dump_json()
    units = read_units(cfg.source)
    ctx = ray.data.DataContext.get_current()
    # Every shard row its own block, so that each one can go to a different processor.
    ctx.target_max_block_size = 1
    ds = ray.data.from_items([{"unit": u.to_json()} for u in units], override_num_blocks=max(1, len(units)))
    # Readers take no CPU slot: they only decompress and split, and a reader waiting for a slot that the
    # processors hold would stall the stream. Their number is bounded instead.
    ds = ds.map_batches(read_shards, batch_size=1, batch_format="numpy", fn_kwargs={"cfg_json": cfg_json},
                        num_cpus=0, compute=ray.data.TaskPoolStrategy(size=max(1, min(len(units), cfg.num_workers))))
    ds = ds.map_batches(ShardProcessor, batch_size=1, batch_format="pyarrow",
                        fn_constructor_kwargs={"cfg_json": cfg_json, "seed": seed, "layout": layout,
                                              "encoder": EncoderSpec.of(tokenizer), "log_dir": log_dir,
                                              "stall_timeout_s": stall_timeout_s},
                        # one shard running and the next one waiting on each processor: the last shards
                        # go to whichever processor is free, not to a queue decided early
                        compute=ray.data.ActorPoolStrategy(size=cfg.num_workers, max_tasks_in_flight_per_actor=2),
                        num_cpus=cfg.cpus_per_worker)
    progress = SourceProgress(cfg, units)
    records = []
    for row in ds.iter_rows():
        records.append(shard_result(row["result"]))
        if on_progress is not None:
            try:
                on_progress(*progress.add(records[-1]))
            except Exception as exc:  # the console's trouble never stops the stage
                logging.getLogger("pofa.preprocess").warning("progress report failed: %s", exc)
                on_progress = None
    records.sort(key=lambda r: r.shard_id)
    layout.pull(layout.stage_dir("preprocess"))  # shards written on other nodes: into this node's copy too
    stats, files, record = finish_preprocess(cfg, layout, records, vocab_size=len(tokenizer))
    return {**stats, "read_units": len(units)}, files, record


def finish_preprocess(cfg: PreprocessConfig, layout: RunLayout, records: list[ShardRecord],
                      vocab_size: Optional[int] = None) -> tuple[dict[str, Any], dict[str, str], PreprocessOutput]:
    """From the shards' completion records: statistics, output hashes and the typed output record."""
    files: dict[str, str] = {}
    splits: dict[str, list[ShardInfo]] = {split: [] for split in SPLITS}
    # each split's folder resolved once: a realpath per shard (~8 lstat calls) dominated at 300k shards
    folders = {split: layout.stage_rel("preprocess", layout.split_dir(split)) for split in SPLITS}
    for r in records:
        for split, shard in r.shards.items():
            name = shard.name
            if os.path.basename(name) != name or name in ("", ".", ".."):
                raise ValueError(f"shard record {r.shard_id}: {name!r} is not a shard file name")
            files[f"{folders[split]}/{name}"] = shard.sha256
            splits[split].append(shard)
    files.update(layout.file_hashes("preprocess", layout.tokenizer))
    if vocab_size is None:
        vocab_size = len(load_tokenizer(layout.tokenizer))
    record = PreprocessOutput(
        splits={split: {"shards": shards, "rows": sum(s.rows for s in shards)} for split, shards in splits.items()},
        tokenizer=layout.rel(layout.tokenizer),
        masking=MaskingContract(kind=cfg.masking, masked_lm_prob=cfg.masked_lm_prob,
                                max_predictions_per_seq=cfg.max_predictions_per_seq, copies=cfg.dupe_factor),
        max_seq_length=cfg.max_seq_length, vocab_size=vocab_size)
    return aggregate_stats(records, cfg, vocab_size), files, record


def aggregate_stats(records: list[ShardRecord], cfg: PreprocessConfig, vocab_size: int) -> dict[str, Any]:
    total: Counter = Counter()
    docs: Counter = Counter()
    inst: Counter = Counter()
    skipped: Counter = Counter()
    hist: Counter = Counter()
    for r in records:
        s = r.stats
        docs.update(s.documents)
        inst.update(s.instances)
        skipped.update(s.skipped)
        hist.update(s.length_histogram)
        total.update(sentences=s.sentences, tokens=s.tokens, short_instances=s.short_instances,
                     random_next=s.random_next, masked_tokens=s.masked_tokens, maskable_tokens=s.maskable_tokens)
    n = inst["train"] + inst["validation"]
    return {
        "documents_train": docs["train"],
        "documents_validation": docs["validation"],
        "documents_skipped": dict(sorted(skipped.items())),
        "sentences": total["sentences"],
        "instances_train": inst["train"],
        "instances_validation": inst["validation"],
        "tokens": total["tokens"],
        "short_seq_fraction": total["short_instances"] / n if n else 0.0,
        "nsp_random_fraction": total["random_next"] / n if n else 0.0,
        "masked_token_fraction": (total["masked_tokens"] / total["maskable_tokens"]
                                  if cfg.masking == "static" and total["maskable_tokens"] else None),
        "max_seq_length": cfg.max_seq_length,
        "mean_instance_length": total["tokens"] / n if n else 0.0,
        "length_histogram": {k: hist[k] for k in sorted(hist, key=int)},
        "shards": len(records),
        "vocab_size": vocab_size,
        "masking": cfg.masking,
    }
