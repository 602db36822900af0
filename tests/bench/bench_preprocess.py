"""Preprocess stage throughput against the in-process pipeline, worker scaling, the whole command and memory.

    make bench-preprocess            (or: .venv/bin/python tests/bench/bench_preprocess.py [--repeat 8])

All figures come from one run on the same cleaned text: the Wikipedia fragment shipped with gensim,
parsed once (wikitext parsing and cleaning is timed on its own line, in MB of wikitext per second on one
core), written as a local JSONL source repeated `--repeat` times (16: "the 16x corpus") with distinct
document ids. Every tokens/s figure divides the same number, the corpus's tokens, by a wall time.

- bare tokenizer: the fast tokenizer's batch encode of the documents on one thread (no sentence split).
- in-process pipeline: what a stage worker does to each shard (read the JSONL, cut shards of
  `documents_per_shard` documents, split sentences, tokenize, make NSP instances, write Parquet), called
  directly in this process on one thread: no Ray. The stage's goal is 2 workers >= 0.8 x twice this.
- stage: `run_preprocess` on an already started local Ray (num_cpus = 2), warmed up on a small corpus.
- whole command: `pofa run <recipe> --stages preprocess` as a subprocess, wall clock from start to exit
  (Ray start, tracking store, tokenizer copy, stage and manifest included); goal >= 1.6 x in-process.
- CPU shares: the CPU seconds each process of this process tree spent during the 2-worker stage, sampled.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
os.environ.setdefault("RAYON_NUM_THREADS", "1")

import subprocess  # noqa: E402

import psutil  # noqa: E402
import ray  # noqa: E402

from pipelines.atomic import write_parquet_atomic  # noqa: E402
from pipelines.data.config import PreprocessConfig  # noqa: E402
from pipelines.data.documents import SkipCounter  # noqa: E402
from pipelines.data.shard import SPLITS, clean_document, process_shard  # noqa: E402
from pipelines.data.sources import iter_documents, read_units  # noqa: E402
from pipelines.data.config import SourceConfig  # noqa: E402
from pipelines.data.tokenizer import load_tokenizer, train_wordpiece  # noqa: E402
from workers.preprocess.job import run_preprocess  # noqa: E402
from workers.preprocess.tasks import shard_id  # noqa: E402
from workers.run_layout import RunLayout  # noqa: E402

DUMP = "pkg://gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


_STAGE_ROLE = re.compile("ShardProcessor|read_shards")


class PeakRSS:
    """Peak resident memory of this process and every descendant (the local Ray node), sampled; also
    the CPU seconds each of them spent while sampled (a process's last < 0.1 s may be missed)."""

    def __init__(self) -> None:
        self.peak = 0
        self.cpu: dict[int, tuple[str, float, float]] = {}  # pid -> (name, first cpu seen, last cpu seen)
        self.own_cpu = 0.0  # this sampler's own CPU, spent in the driver process: not the stage's
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        tick = 0
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    with p.oneshot():
                        total += p.memory_info().rss
                        t = p.cpu_times()
                    used = t.user + t.system
                    known = self.cpu.get(p.pid)
                    name = known[0] if known else ""
                    # a pooled Ray worker takes the name of what it runs (looked up every second); a
                    # processor or reader keeps that name for the process's life
                    if known is None or (tick % 10 == 0 and not _STAGE_ROLE.search(name)):
                        name = "driver" if p.pid == me.pid else " ".join(p.cmdline()[:1]) or p.name()
                    self.cpu[p.pid] = (name, known[1] if known else used, used)
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            tick += 1
            self.own_cpu = time.thread_time()
            time.sleep(0.1)

    def __enter__(self) -> "PeakRSS":
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()

    def cpu_by_role(self) -> dict[str, float]:
        """CPU seconds spent while sampled, by role: stage workers, readers, driver, Ray's own processes."""
        roles: dict[str, float] = {}
        for name, first, last in self.cpu.values():
            if "ShardProcessor" in name:
                role = "workers"
            elif "read_shards" in name:
                role = "reader"
            elif name == "driver":
                role = "driver"
                last -= self.own_cpu
            else:
                role = "ray"  # gcs, raylet, dashboard agents, log monitor, idle pooled workers
            roles[role] = roles.get(role, 0.0) + (last - first)
        return roles


def in_process(cfg: PreprocessConfig, tokenizer, out: str) -> None:
    """The stage worker's work on every shard, called directly: one process, one thread, no Ray."""
    def flush(unit: int, chunk: int, docs: list) -> None:
        sid = shard_id(unit, 0, chunk)  # (file, window, chunk): the timing does not need the windows
        tables, _ = process_shard(docs, sid, cfg, 42, tokenizer)
        for split in SPLITS:
            if tables[split].num_rows:
                write_parquet_atomic(tables[split], os.path.join(out, split, f"shard-{sid}.parquet"))

    for unit in read_units(cfg.source):
        docs, chunk = [], 0
        for doc in iter_documents(cfg.source, unit, SkipCounter()):
            docs.append(doc)
            if len(docs) == cfg.documents_per_shard:
                flush(unit.index, chunk, docs)
                docs, chunk = [], chunk + 1
        if docs:
            flush(unit.index, chunk, docs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=16, help="copies of the fragment in the 1x corpus")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="pofa-bench-")

    src = SourceConfig(kind="wikipedia_xml", path=DUMP)
    skipped = SkipCounter()
    raw = [d for u in read_units(src) for d in iter_documents(src, u, skipped)]
    t0, c0 = time.perf_counter(), time.process_time()
    cleaned = [(d, clean_document(d, skipped)) for d in raw]
    parse_s, parse_cpu = time.perf_counter() - t0, time.process_time() - c0
    wikitext_mb = sum(len(d.text.encode("utf-8")) for d in raw) / 1e6
    cleaned = [(d, t) for d, t in cleaned if t]
    tok_dir = os.path.join(work, "tokenizer")
    train_wordpiece((t for _, t in cleaned), 8000, True, tok_dir, 128)

    def corpus(copies: int) -> str:
        path = os.path.join(work, f"corpus-{copies}.jsonl")
        with open(path, "w") as f:
            for c in range(copies):
                for d, text in cleaned:
                    f.write(json.dumps({"id": f"{c}-{d.doc_id}", "title": d.title, "text": text}) + "\n")
        return path

    def config(path: str, workers: int) -> PreprocessConfig:
        return PreprocessConfig.model_validate({
            "source": {"kind": "jsonl", "path": path}, "tokenizer": {"name": tok_dir},
            "num_workers": workers, "documents_per_shard": 100, "max_seq_length": 128})

    one_x = corpus(args.repeat)
    docs_1x = args.repeat * len(cleaned)
    texts = [t for _, t in cleaned] * args.repeat
    tok = load_tokenizer(tok_dir)
    tok.model_max_length = 1 << 30
    t0 = time.perf_counter()
    for i in range(0, len(texts), 64):
        ids = tok(texts[i:i + 64], add_special_tokens=False)["input_ids"]
    bare_s = time.perf_counter() - t0
    corpus_tokens = sum(len(x) for x in tok(texts[:len(cleaned)], add_special_tokens=False)["input_ids"]) * args.repeat
    del ids

    t0, c0 = time.perf_counter(), time.process_time()
    in_process(config(one_x, 1), tok, tempfile.mkdtemp(dir=work))
    inproc_s, inproc_cpu = time.perf_counter() - t0, time.process_time() - c0

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)

    def stage(path: str, workers: int) -> tuple[float, PeakRSS]:
        out = RunLayout.open(tempfile.mkdtemp(dir=work))
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            run_preprocess(config(path, workers), 42, out)
            return time.perf_counter() - t0, mem

    stage(corpus(1), 2)  # warm-up: imports and actor start paths cached
    s1, _ = stage(one_x, 1)
    s2, mem_1x = stage(one_x, 2)
    s2_4x, mem_4x = stage(corpus(4 * args.repeat), 2)
    ray.shutdown()

    # The whole command, as a user types it: its own Ray start, tracking store and manifest.
    recipe = os.path.join(work, "recipe.yaml")
    with open(recipe, "w") as f:
        json.dump({"name": "bench-preprocess", "seed": 42, "stages": ["preprocess"],
                   "preprocess": config(one_x, 2).model_dump(mode="json", exclude_defaults=True)}, f)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    t0, started = time.perf_counter(), time.time()
    done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", recipe, "--stages", "preprocess",
                           "--run-dir", os.path.join(work, "run-cmd")], cwd=root, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    command_s, ended = time.perf_counter() - t0, time.time()
    if done.returncode != 0:
        print(done.stdout[-3000:])
        raise SystemExit(f"pofa run exited with {done.returncode}")

    inproc_tps = corpus_tokens / inproc_s
    with open(RunLayout.open(os.path.join(work, "run-cmd")).manifest("preprocess")) as f:
        manifest = json.load(f)  # when the stage itself started and finished
    command_note = (f"{command_s:.1f} s: {manifest['started'] - started:.1f} start, "
                    f"{manifest['wall_time_s']:.1f} stage, {ended - manifest['finished']:.1f} exit")
    cpu = mem_1x.cpu_by_role()
    cpu_total = sum(cpu.values())
    shares = ", ".join(f"{role} {cpu.get(role, 0.0):.1f}" for role in ("workers", "reader", "driver", "ray"))
    rows = [
        ("wikitext parse + clean (1 process)", f"{wikitext_mb / parse_cpu:.2f} MB/s/core",
         f"{len(raw) / parse_s:,.0f} docs/s, {wikitext_mb:.1f} MB"),
        ("bare tokenizer batch encode (1 thread)", f"{corpus_tokens / bare_s:,.0f} tokens/s", "no sentence split"),
        ("in-process pipeline (1 thread, no Ray)", f"{inproc_tps:,.0f} tokens/s",
         f"{docs_1x / inproc_s:,.0f} docs/s, {inproc_cpu:.1f} CPU s"),
        ("stage, 1 worker", f"{corpus_tokens / s1:,.0f} tokens/s", f"{docs_1x / s1:,.0f} docs/s"),
        ("stage, 2 workers", f"{corpus_tokens / s2:,.0f} tokens/s", f"{docs_1x / s2:,.0f} docs/s"),
        ("stage 2 workers / (2 x in-process)", f"{inproc_s / (2 * s2):.2f}", "goal >= 0.80"),
        ("whole command, 2 workers", f"{corpus_tokens / command_s:,.0f} tokens/s", command_note),
        ("whole command / in-process", f"{inproc_s / command_s:.2f}x", "goal >= 1.6x"),
        ("stage 1 worker / bare tokenizer", f"{bare_s / s1:.2f}", "goal >= 0.60"),
        ("speed-up 1 -> 2 workers", f"{s1 / s2:.2f}x", "goal >= 1.7x"),
        ("CPU s in the 2-worker stage", f"{cpu_total:.1f} of {2 * s2:.1f}", shares),
        ("in-process CPU / stage CPU", f"{inproc_cpu / cpu_total:.2f}", "bounds the 2-worker ratio, quiet machine"),
        ("peak memory, corpus 1x", f"{mem_1x.peak / 2**20:,.0f} MiB", f"{docs_1x} docs"),
        ("peak memory, corpus 4x", f"{mem_4x.peak / 2**20:,.0f} MiB", f"ratio {mem_4x.peak / mem_1x.peak:.2f} (goal <= 1.2)"),
    ]
    print(f"\npreprocess benchmark: {corpus_tokens:,} tokens in the 1x corpus ({args.repeat} copies), "
          f"{os.cpu_count()} CPUs, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    print(f"| {'measure':38s} | {'value':>22s} | {'note':42s} |")
    print(f"|{'-' * 40}|{'-' * 24}|{'-' * 44}|")
    for name, value, note in rows:
        print(f"| {name:38s} | {value:>22s} | {note:42s} |")


if __name__ == "__main__":
    main()
