"""The preprocess stage on Ray Data: read units -> shards -> Parquet, streaming, one actor per worker.

Entry point: `run_preprocess(cfg, seed, out_dir)`; the caller has connected to Ray. Memory stays bounded:
the readers stream documents, each shard is one row in flight, and Ray Data backpressures the readers
when the processors fall behind.
"""
from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from typing import Any, Optional

import ray

from pipelines.data.config import PreprocessConfig
from pipelines.data.documents import SkipCounter
from pipelines.data.shard import clean_document
from pipelines.data.sources import iter_documents, read_units
from pipelines.data.tokenizer import load_tokenizer, train_wordpiece
from pipelines.atomic import file_sha256
from workers.preprocess.tasks import ShardProcessor, read_shards
from workers.storage import RunStore

# One tokenizer thread per worker: the workers are the parallelism, and measuring their scaling needs this.
_WORKER_ENV = {"RAYON_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


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
def _train_tokenizer(cfg_json: str, out_dir: str, store: Optional[RunStore] = None) -> None:
    """Runs on any node; with a run directory on an object store its files go to the store (the
    driver's mirror fetches them), `tokenizer.json` last since its presence means done."""
    cfg = PreprocessConfig.model_validate_json(cfg_json)
    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    train_wordpiece(_corpus_sample(cfg), cfg.tokenizer.train_vocab_size, cfg.tokenizer.lowercase, tmp,
                    cfg.max_seq_length)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    if store is not None and store.remote:
        rel = store.rel(out_dir)
        names = sorted(os.listdir(out_dir), key=lambda n: n == "tokenizer.json")
        for name in names:
            store.upload(f"{rel}/{name}")


def prepare_tokenizer(cfg: PreprocessConfig, tokenizer_dir: str, store: Optional[RunStore] = None) -> None:
    """Put the tokenizer in the run directory, so the run needs nothing outside it to resume or train."""
    if os.path.exists(os.path.join(tokenizer_dir, "tokenizer.json")):
        return  # made by an interrupted attempt with the same fingerprint
    if cfg.tokenizer.trains:
        ray.get(_train_tokenizer.remote(cfg.model_dump_json(), tokenizer_dir, store))
        if store is not None and store.remote:
            store.pull(store.rel(tokenizer_dir))
        return
    tmp = tokenizer_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    load_tokenizer(cfg.tokenizer.name).save_pretrained(tmp)
    os.replace(tmp, tokenizer_dir)
    if store is not None and store.remote:
        store.push(store.rel(tokenizer_dir))


def run_preprocess(cfg: PreprocessConfig, seed: int, out_dir: str,
                   store: Optional[RunStore] = None) -> tuple[dict[str, Any], dict[str, str]]:
    """Run the stage; returns (manifest statistics, output files relative to out_dir -> sha256).
    `store`: the run directory's object store, when `out_dir` is its mirror."""
    tokenizer_dir = os.path.join(out_dir, "tokenizer")
    prepare_tokenizer(cfg, tokenizer_dir, store)
    cfg_json = cfg.model_dump_json()
    units = read_units(cfg.source)
    ctx = ray.data.DataContext.get_current()
    # Every shard row its own block, so that each one can go to a different processor.
    ctx.target_max_block_size = 1
    ds = ray.data.from_items([{"unit": u.index, "location": u.location} for u in units],
                             override_num_blocks=max(1, len(units)))
    # Readers take no CPU slot: they only decompress and split, and a reader waiting for a slot that the
    # processors hold would stall the stream. Their number is bounded instead.
    ds = ds.map_batches(read_shards, batch_size=1, batch_format="numpy", fn_kwargs={"cfg_json": cfg_json},
                        num_cpus=0, compute=ray.data.TaskPoolStrategy(size=max(1, min(len(units), cfg.num_workers))))
    ds = ds.map_batches(ShardProcessor, batch_size=1, batch_format="pyarrow",
                        fn_constructor_kwargs={"cfg_json": cfg_json, "seed": seed, "out_dir": out_dir,
                                               "tokenizer_dir": tokenizer_dir, "store": store},
                        compute=ray.data.ActorPoolStrategy(size=cfg.num_workers), num_cpus=cfg.cpus_per_worker,
                        runtime_env={"env_vars": _WORKER_ENV})
    records = sorted((json.loads(r["result"]) for r in ds.iter_rows()), key=lambda r: r["shard_id"])
    if store is not None and store.remote:  # shards written on other nodes: into this mirror too
        store.pull(store.rel(out_dir))
    files: dict[str, str] = {}
    for r in records:
        files.update(r["files"])
    for name in sorted(os.listdir(tokenizer_dir)):
        files[f"tokenizer/{name}"] = file_sha256(os.path.join(tokenizer_dir, name))
    return aggregate_stats(records, cfg, len(load_tokenizer(tokenizer_dir))), files


def aggregate_stats(records: list[dict], cfg: PreprocessConfig, vocab_size: int) -> dict[str, Any]:
    total: Counter = Counter()
    docs: Counter = Counter()
    inst: Counter = Counter()
    skipped: Counter = Counter()
    hist: Counter = Counter()
    for r in records:
        s = r["stats"]
        docs.update(s["documents"])
        inst.update(s["instances"])
        skipped.update(s["skipped"])
        hist.update(s["length_histogram"])
        for key in ("sentences", "tokens", "short_instances", "random_next", "masked_tokens", "maskable_tokens"):
            total[key] += s[key]
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
