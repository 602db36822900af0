"""Preprocess stage throughput against the bare tokenizer, worker scaling and peak memory.

    make bench-preprocess            (or: .venv/bin/python tests/bench/bench_preprocess.py [--repeat 8])

All figures come from one run on the same cleaned text: the Wikipedia fragment shipped with gensim,
parsed once (wikitext parsing is timed on its own line), written as a local JSONL source repeated
`--repeat` times with distinct document ids. The ceiling is the bare fast tokenizer's batch encode of
the same documents on one thread, as each stage worker runs one tokenizer thread.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
os.environ.setdefault("RAYON_NUM_THREADS", "1")

import psutil  # noqa: E402
import ray  # noqa: E402

from pipelines.data.config import PreprocessConfig  # noqa: E402
from pipelines.data.documents import SkipCounter  # noqa: E402
from pipelines.data.shard import clean_document  # noqa: E402
from pipelines.data.sources import iter_documents, read_units  # noqa: E402
from pipelines.data.config import SourceConfig  # noqa: E402
from pipelines.data.tokenizer import load_tokenizer, train_wordpiece  # noqa: E402
from workers.preprocess.job import run_preprocess  # noqa: E402

DUMP = "pkg://gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


class PeakRSS:
    """Peak resident memory of this process and every descendant (the local Ray node), sampled."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(0.1)

    def __enter__(self) -> "PeakRSS":
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=16, help="copies of the fragment in the 1x corpus")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="pofa-bench-")

    src = SourceConfig(kind="wikipedia_xml", path=DUMP)
    skipped = SkipCounter()
    raw = [d for u in read_units(src) for d in iter_documents(src, u, skipped)]
    t0 = time.perf_counter()
    cleaned = [(d, clean_document(d, skipped)) for d in raw]
    parse_s = time.perf_counter() - t0
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

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)

    def stage(path: str, workers: int) -> tuple[float, int]:
        cfg = PreprocessConfig.model_validate({
            "source": {"kind": "jsonl", "path": path}, "tokenizer": {"name": tok_dir},
            "num_workers": workers, "documents_per_shard": 100, "max_seq_length": 128})
        out = tempfile.mkdtemp(dir=work)
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            run_preprocess(cfg, 42, out)
            return time.perf_counter() - t0, mem.peak

    stage(one_x, 1)  # warm-up: imports and actor start paths cached
    s1, _ = stage(one_x, 1)
    s2, peak_1x = stage(one_x, 2)
    s2_4x, peak_4x = stage(corpus(4 * args.repeat), 2)
    ray.shutdown()

    rows = [
        ("wikitext parse + clean (1 process)", f"{len(raw) / parse_s:,.0f} docs/s", f"{len(raw)} pages"),
        ("bare tokenizer batch encode (1 thread)", f"{corpus_tokens / bare_s:,.0f} tokens/s", "ceiling"),
        ("stage, 1 worker", f"{corpus_tokens / s1:,.0f} tokens/s", f"{docs_1x / s1:,.0f} docs/s"),
        ("stage, 2 workers", f"{corpus_tokens / s2:,.0f} tokens/s", f"{docs_1x / s2:,.0f} docs/s"),
        ("stage 1 worker / ceiling", f"{bare_s / s1:.2f}", "goal >= 0.60"),
        ("speed-up 1 -> 2 workers", f"{s1 / s2:.2f}x", "goal >= 1.7x"),
        ("peak memory, corpus 1x", f"{peak_1x / 2**20:,.0f} MiB", f"{docs_1x} docs"),
        ("peak memory, corpus 4x", f"{peak_4x / 2**20:,.0f} MiB", f"ratio {peak_4x / peak_1x:.2f} (goal <= 1.2)"),
    ]
    print(f"\npreprocess benchmark: {corpus_tokens:,} tokens in the 1x corpus, {os.cpu_count()} CPUs\n")
    print(f"| {'measure':40s} | {'value':>22s} | {'note':24s} |")
    print(f"|{'-' * 42}|{'-' * 24}|{'-' * 26}|")
    for name, value, note in rows:
        print(f"| {name:40s} | {value:>22s} | {note:24s} |")


if __name__ == "__main__":
    main()
