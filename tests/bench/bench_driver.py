"""The preprocess stage's driver at full-scale bookkeeping, no real text (`make bench-driver`): one table.

Full English Wikipedia cut into 1 MB read units is some 22,000 units; with shards per 1 MB window and a
few runs of `documents_per_shard` in some, hundreds of thousands of shard records reach the driver. This
measures what the driver does per unit and per shard, with the stage's own code:

1. bookkeeping (no Ray): `read_units` on a 22 GB single-stream dump (a sparse file: no disk used),
   `SourceProgress.add` for every shard record, `finish_preprocess` (statistics, output hashes, the typed
   output record) and the manifest written by the orchestrator's writer; time per shard, and the peak
   of Python allocations (tracemalloc) and the process RSS;
2. a multistream index (`offset:id:title` lines, bzip2) read by `read_units`, per index line;
3. the real Ray Data pipeline of `run_preprocess` with the reader and the processor replaced by fakes
   that make shard rows and records without text: the driver's time per unit and per shard, and its RSS;
4. resume: a processor given shards whose completion records exist finds each one by its id (one
   `open`, one hash per file), never by listing the folder; the time per finished shard with 10x more
   records beside it stays the same.

Usage: python tests/bench/bench_driver.py [--units 22000] [--shards 300000] [--index-lines 2300000]
       [--ray-units 400] [--ray-shards-per-unit 10] [--resume 2000]
"""
from __future__ import annotations

import argparse
import bz2
import json
import os
import random
import sys
import tempfile
import time
import tracemalloc

import psutil

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from pipelines.data.config import PreprocessConfig  # noqa: E402
from pipelines.data.units import read_units  # noqa: E402
from workers.run_records import ShardInfo, ShardRecord, dump_record, write_record  # noqa: E402

MB = 1 << 20


def _rss() -> float:
    return psutil.Process().memory_info().rss / MB


def _stats(rng: random.Random) -> dict:
    """A shard's statistics as `process_shard` writes them (a few hundred documents' worth)."""
    docs = rng.randint(50, 400)
    inst = docs * 9
    return {"documents": {"train": docs - docs // 20, "validation": docs // 20},
            "instances": {"train": inst - inst // 20, "validation": inst // 20},
            "skipped": {"redirect": rng.randint(0, 900), "disambiguation": rng.randint(0, 9), "too_short": 2},
            "sentences": docs * 40, "tokens": inst * 120, "short_instances": inst // 10, "random_next": inst // 2,
            "masked_tokens": 0, "maskable_tokens": 0,
            "length_histogram": {str(b): rng.randint(0, 99) for b in range(0, 128, 16)}}


def _record(sid: str, unit: int, span: tuple[float, float], rng: random.Random) -> ShardRecord:
    return ShardRecord.model_validate({
        "shard_id": sid, "unit": unit, "stats": _stats(rng), "read_span": list(span),
        "shards": {split: {"name": f"shard-{sid}.parquet", "rows": rng.randint(100, 4000),
                           "sha256": "%064x" % rng.getrandbits(256)} for split in ("train", "validation")}})


def _cfg(path: str, **source) -> PreprocessConfig:
    return PreprocessConfig.model_validate({"source": {"kind": "wikipedia_xml", "path": path, **source},
                                            "tokenizer": {"name": "unused"}})


def bookkeeping(root: str, n_units: int, n_shards: int) -> list[tuple[str, str]]:
    from orchestrator.fingerprints import fingerprint, write_stage_manifest
    from workers.preprocess.job import SourceProgress, finish_preprocess
    from workers.run_layout import RunLayout

    dump = os.path.join(root, "enwiki-pages-articles.xml.bz2")
    with open(dump, "wb") as f:
        f.truncate(n_units * 1_000_000)  # sparse: the size of the dump, no disk
    cfg = _cfg(dump, read_unit_mb=1)
    rows = []
    tracemalloc.start()
    t = time.perf_counter()
    units = read_units(cfg.source)
    t_units = time.perf_counter() - t
    rows.append(("read units (1 MB each) of a %.0f GB single-stream dump" % (n_units / 1000), f"{len(units):,}"))
    rows.append(("`read_units`, driver time", f"{t_units:.3f} s ({t_units / len(units) * 1e6:.1f} µs/unit)"))
    t = time.perf_counter()
    rows_json = [u.to_json() for u in units]
    t_rows = time.perf_counter() - t
    rows.append(("units serialized into dataset rows", f"{t_rows:.3f} s ({sum(map(len, rows_json)) / MB:.1f} MiB)"))

    rng = random.Random(0)
    per_unit = max(1, n_shards // len(units))
    records = []
    for u in units:
        k = per_unit + (1 if u.index < n_shards - per_unit * len(units) else 0)
        for c in range(k):
            records.append(_record(f"00000-{u.index:07d}-{c:05d}", u.index, (c / k, (c + 1) / k), rng))
    rng.shuffle(records)  # processors finish in any order
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    progress = SourceProgress(cfg, units)
    t = time.perf_counter()
    for r in records:
        progress.add(r)
    t_progress = time.perf_counter() - t
    assert abs(progress.done - progress.total) < 1e-3 * progress.total
    layout = RunLayout.open(os.path.join(root, "run"))
    os.makedirs(layout.tokenizer, exist_ok=True)
    with open(os.path.join(layout.tokenizer, "tokenizer.json"), "w") as f:
        f.write("{}")
    t = time.perf_counter()
    records.sort(key=lambda r: r.shard_id)
    stats, outputs, record = finish_preprocess(cfg, layout, records, vocab_size=30522)
    t_finish = time.perf_counter() - t
    t = time.perf_counter()
    config = cfg.model_dump(mode="json")
    write_stage_manifest(layout, "preprocess", fingerprint(config), {}, config, stats, outputs, record, time.time())
    t_manifest = time.perf_counter() - t
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    size = os.path.getsize(layout.manifest("preprocess")) / MB
    n = len(records)
    rows += [
        ("shard records (fake statistics, 2 splits each)", f"{n:,}"),
        ("`SourceProgress.add` per finished shard", f"{t_progress / n * 1e6:.1f} µs ({t_progress:.2f} s in all)"),
        ("sort + `finish_preprocess` (stats, hashes, output record)", f"{t_finish:.2f} s ({t_finish / n * 1e6:.1f} µs/shard)"),
        ("manifest written (orchestrator's writer)", f"{t_manifest:.2f} s, {size:.0f} MiB on disk"),
        ("peak Python allocations beyond the records (progress + finish + manifest)", f"{peak / MB:.0f} MiB"),
        ("driver RSS after all of it (records held)", f"{_rss():.0f} MiB"),
    ]
    return rows


def index_reading(root: str, lines: int) -> list[tuple[str, str]]:
    path = os.path.join(root, "xxwiki-pages-articles-multistream.xml.bz2")
    index = os.path.join(root, "xxwiki-pages-articles-multistream-index.txt.bz2")
    streams = lines // 100
    size = streams * 100_000  # ~100 kB per stream of 100 pages, as in enwiki
    with open(path, "wb") as f:
        f.truncate(size)
    with bz2.open(index, "wt", compresslevel=1) as f:
        for s in range(streams):
            offset = 600 + s * 100_000
            f.write("".join(f"{offset}:{s * 100 + p + 10}:Some page title {s}/{p}\n" for p in range(100)))
    t = time.perf_counter()
    units = read_units(_cfg(path, read_unit_mb=1).source)
    elapsed = time.perf_counter() - t
    assert sum(len(u.streams) for u in units) == streams
    return [(f"multistream index read by `read_units` ({lines:,} lines, {streams:,} streams, {len(units):,} units)",
             f"{elapsed:.2f} s ({elapsed / lines * 1e6:.2f} µs/line; enwiki's ~23M lines: "
             f"~{elapsed / lines * 23e6:.0f} s)")]


def ray_pipeline(root: str, n_units: int, per_unit: int) -> list[tuple[str, str]]:
    """`run_preprocess` for real on Ray Data, its reader and processor replaced by text-free fakes."""
    import pyarrow as pa
    import ray
    from transformers import BertTokenizerFast

    import workers.preprocess.job as job
    from pipelines.data.units import ReadUnit
    from workers.run_layout import RunLayout

    vocab = os.path.join(root, "vocab")
    os.makedirs(vocab, exist_ok=True)
    with open(os.path.join(vocab, "vocab.txt"), "w") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b"]) + "\n")
    BertTokenizerFast(os.path.join(vocab, "vocab.txt")).save_pretrained(vocab)
    dump = os.path.join(root, "ray-dump.xml.bz2")
    with open(dump, "wb") as f:
        f.truncate(n_units * 1_000_000)
    cfg = PreprocessConfig.model_validate({"source": {"kind": "wikipedia_xml", "path": dump, "read_unit_mb": 1},
                                           "tokenizer": {"name": vocab}, "num_workers": 2})

    def fake_reader(batch: dict, cfg_json: str):
        for text in batch["unit"]:
            unit = ReadUnit.from_json(str(text))
            for c in range(per_unit):
                yield pa.table({"shard_id": [f"00000-{unit.index:07d}-{c:05d}"], "unit": [unit.index],
                                "read_span": [[c / per_unit, (c + 1) / per_unit]]})

    class FakeProcessor:
        def __init__(self, **_: object) -> None:
            self.rng = random.Random(os.getpid())

        def __call__(self, batch: pa.Table) -> pa.Table:
            rows = batch.to_pylist()
            return pa.table({"shard_id": [r["shard_id"] for r in rows],
                             "result": [json.dumps(dump_record(_record(r["shard_id"], r["unit"], tuple(r["read_span"]),
                                                                               self.rng))) for r in rows]})

    job.read_shards, job.ShardProcessor = fake_reader, FakeProcessor
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": REPO}})
    try:
        layout = RunLayout.open(os.path.join(root, "ray-run"))
        seen: list[float] = []  # when each shard's record reached the driver
        before, cpu0, t = _rss(), psutil.Process().cpu_times(), time.perf_counter()
        stats, _, _ = job.run_preprocess(cfg, 0, layout, on_progress=lambda *_: seen.append(time.perf_counter()))
        elapsed, cpu1 = time.perf_counter() - t, psutil.Process().cpu_times()
    finally:
        ray.shutdown()
    n = stats["shards"]
    driver_cpu = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
    steady = (seen[-1] - seen[0]) / max(1, len(seen) - 1)
    return [(f"Ray Data pipeline, fake reader and processor: {stats['read_units']:,} units, {n:,} shards",
             f"{elapsed:.1f} s ({seen[0] - t:.1f} s to the first shard: actors starting)"),
            ("  wall time per shard after the first (2 CPUs, Ray's scheduling and object store included)",
             f"{steady * 1e3:.2f} ms"),
            ("  driver process CPU per shard", f"{driver_cpu / n * 1e3:.2f} ms"),
            ("  driver RSS growth over the run", f"{_rss() - before:.0f} MiB")]


def resume(root: str, n: int) -> list[tuple[str, str]]:
    """Time per already finished shard for a processor, with n and 10 n finished records in the folder."""
    import pyarrow as pa

    from pipelines.atomic import write_parquet_atomic
    from workers.preprocess.tasks import ShardProcessor
    from workers.run_layout import RunLayout

    out = []
    for total in (n, 10 * n):
        layout = RunLayout.open(os.path.join(root, f"resume-{total}"))
        table = pa.table({"input_ids": [[1, 2, 3]] * 50})
        for i in range(total):
            sid = f"00000-{i:07d}-00000"
            path = layout.shard("train", f"shard-{sid}.parquet")
            digest = write_parquet_atomic(table, path)
            record = _record(sid, i, (0.0, 1.0), random.Random(i)).model_copy(
                update={"shards": {"train": ShardInfo(name=f"shard-{sid}.parquet", rows=50, sha256=digest)}})
            write_record(record, layout.shard_record(sid))
        processor = ShardProcessor.__new__(ShardProcessor)  # the lookup path only: no tokenizer needed
        processor.layout, processor.watchdog = layout, None
        rows = [{"shard_id": f"00000-{i:07d}-00000", "unit": i, "read_span": [0.0, 1.0]} for i in range(n)]
        listed = []
        real_listdir = os.listdir
        os.listdir = lambda p=".": listed.append(p) or real_listdir(p)  # a listing would show here
        try:
            t = time.perf_counter()
            done = [processor._one(r) for r in rows]
            elapsed = time.perf_counter() - t
        finally:
            os.listdir = real_listdir
        assert len(done) == n and not listed and all(d.shards["train"].rows == 50 for d in done)
        out.append((f"resume: a finished shard found by its id ({total:,} records in the folder, {n:,} looked up)",
                    f"{elapsed / n * 1e6:.0f} µs/shard, 0 listings"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--units", type=int, default=22_000)
    ap.add_argument("--shards", type=int, default=300_000)
    ap.add_argument("--index-lines", type=int, default=2_300_000)
    ap.add_argument("--ray-units", type=int, default=400)
    ap.add_argument("--ray-shards-per-unit", type=int, default=10)
    ap.add_argument("--resume", type=int, default=2_000)
    args = ap.parse_args()
    print(f"load average before: {os.getloadavg()}", flush=True)
    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="bench-driver-") as root:
        rows += bookkeeping(root, args.units, args.shards)
        rows += index_reading(root, args.index_lines)
        rows += resume(root, args.resume)
        rows += ray_pipeline(root, args.ray_units, args.ray_shards_per_unit)
    width = max(len(k) for k, _ in rows)
    print(f"\n| {'measure'.ljust(width)} | value |\n|{'-' * (width + 2)}|---|")
    for k, v in rows:
        print(f"| {k.ljust(width)} | {v} |")
    print(f"\nload average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
