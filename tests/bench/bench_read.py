"""One Wikipedia dump read by many readers (`make bench-read`): prints one table.

The dump is real MediaWiki export XML made from the pages of the fragment gensim ships, repeated with new
page ids until it holds `--size-mb` MB of XML, written twice: as one bzip2 stream (what
`pages-articles.xml.bz2` is) and as Wikimedia's multistream dump (streams of 100 pages) with its index.
Both are built once and kept in runs/bench-read/ for later runs.

- reader throughput per core: one process reads the whole dump (bzip2 decode, page split, XML parse:
  the reader task's work, no cleaning), in compressed and XML MB/s;
- 1 -> 2 readers on one file: the dump cut into read units of `--unit-mb`, read by 1 and by 2 processes;
  the speed-up, and the documents (ids and text hashes, in order) identical to one reader's;
- end to end: the real preprocess stage (`pofa run` of the tiny recipe on the first `--stage-mb` and
  3 x `--stage-mb` MB of the dump's XML, as subprocesses, read_unit_mb 1) with 1 and 2 workers: XML
  bytes/s/core from the slope between the two sizes (fixed costs drop out) of the stage's wall time and
  of the CPU seconds of the command and every process it started (what other jobs' load changes least),
  the speed-up, and the output files identical;
- from those rates, the estimate for full English Wikipedia (see README, "Performance").

Usage: python tests/bench/bench_read.py [--size-mb 200] [--stage-mb 6] [--unit-mb 4]
"""
from __future__ import annotations

import argparse
import bz2
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from pipelines.data.config import SourceConfig  # noqa: E402
from pipelines.data.paths import resolve_source_path  # noqa: E402
from pipelines.data.sources import iter_items, read_units  # noqa: E402
from pipelines.data.units import ReadUnit  # noqa: E402
from pipelines.data.xml_pages import Piece, iter_pages  # noqa: E402

GENSIM = "pkg://gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
CACHE = os.path.join(REPO, "runs", "bench-read")
_ID = re.compile(rb"<id>\d+</id>")
_TITLE = re.compile(rb"<title>(.*?)</title>", re.S)
MB = 1_000_000
TRAIN_DOCUMENTS = 90


def _gensim_pages() -> tuple[bytes, list[bytes]]:
    xml = bz2.decompress(open(resolve_source_path(GENSIM), "rb").read())
    head = xml[: xml.index(b"<page>")]
    pages = [page for _, page in iter_pages(iter([Piece(0, True, xml, 0.0)]))]
    return head, pages


def build(size_mb: float, folder: str) -> tuple[str, str]:
    """(single-stream dump, multistream dump) of about `size_mb` MB of XML; kept once built."""
    single = os.path.join(folder, "enwiki-bench-pages-articles.xml.bz2")
    multi = os.path.join(folder, "enwiki-bench-pages-articles-multistream.xml.bz2")
    index = os.path.join(folder, "enwiki-bench-pages-articles-multistream-index.txt.bz2")
    if all(os.path.exists(p) for p in (single, multi, index)):
        return single, multi
    os.makedirs(folder, exist_ok=True)
    head, pages = _gensim_pages()
    foot = b"</mediawiki>\n"
    one = bz2.BZ2Compressor(9)
    with open(single + ".tmp", "wb") as s, open(multi + ".tmp", "wb") as m, bz2.open(index + ".tmp", "wt") as ix:
        s.write(one.compress(head))
        m.write(bz2.compress(head))
        written, next_id, group = len(head), 10, []
        while written < size_mb * MB:
            for page in pages:
                page = _ID.sub(b"<id>%d</id>" % next_id, page, count=1) + b"\n  "
                group.append((next_id, page))
                next_id += 1
                written += len(page)
                s.write(one.compress(page))
                if len(group) == 100:
                    _stream(m, ix, group)
                    group = []
        if group:
            _stream(m, ix, group)
        s.write(one.compress(foot))
        s.write(one.flush())
        m.write(bz2.compress(foot))
    for p in (single, multi, index):
        os.replace(p + ".tmp", p)
    return single, multi


def _stream(out, index, group: list[tuple[int, bytes]]) -> None:
    offset = out.tell()
    out.write(bz2.compress(b"".join(page for _, page in group)))
    for page_id, page in group:
        title = _TITLE.search(page)
        index.write(f"{offset}:{page_id}:{title.group(1).decode() if title else ''}\n")


def _digest_units(cfg_json: str, units_json: list[str]) -> tuple[bytes, int, float]:
    """What a reader task does to its units, then a digest of each document it yielded (window, id,
    text), in order; and the CPU seconds it took (what other jobs' load changes least)."""
    cfg = SourceConfig.model_validate_json(cfg_json)
    out, docs, skipped, cpu = bytearray(), 0, 0, time.process_time()
    for text in units_json:
        for window, item in iter_items(cfg, ReadUnit.from_json(text)):
            if isinstance(item, str):
                skipped += 1
            else:
                docs += 1
                out += hashlib.sha256(f"{window}:{item.doc_id}:{item.text}".encode()).digest()
    return bytes(out), docs, time.process_time() - cpu


def read_with(path: str, workers: int, unit_mb: float) -> tuple[float, bytes, int, int, float]:
    """Wall time to read the dump with `workers` processes, each taking the next unit; the per-unit
    digests in unit order (the same whatever the worker count if every document is read once)."""
    cfg = SourceConfig(kind="wikipedia_xml", path=path, read_unit_mb=unit_mb)
    units = read_units(cfg)
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(int, range(workers)))  # processes started before the clock
        t = time.perf_counter()
        results = list(pool.map(_digest_units, [cfg.model_dump_json()] * len(units), [[u.to_json()] for u in units]))
        elapsed = time.perf_counter() - t
    return elapsed, b"".join(r[0] for r in results), sum(r[1] for r in results), len(units), sum(r[2] for r in results)


def stage(path: str, workers: int, run_dir: str, unit_mb: float) -> tuple[float, float, dict, dict]:
    """`pofa run` of the preprocess stage on `path`: (the stage's own wall time, the CPU seconds of the whole
    command and every process it started, stats, outputs)."""
    cmd = [sys.executable, "-m", "orchestrator.cli", "run", "tiny", "--stages", "preprocess", "--run-dir", run_dir,
           "--set", f"preprocess.source.path={path}", "--set", f"preprocess.num_workers={workers}",
           "--set", f"preprocess.source.read_unit_mb={unit_mb}", "--set", "preprocess.documents_per_shard=500",
           # 90: fewer than the 6 MB slice's 98 articles with text, so both slices train the same tokenizer
           # on the same pages and its cost drops out of the slope (200 made it grow with the slice)
           "--set", f"preprocess.tokenizer.train_documents={TRAIN_DOCUMENTS}", "--set", f"ray.num_cpus={max(2, workers)}",
           "--set", "tracking.enabled=false"]
    cpu = _tree_cpu(cmd)
    manifest = json.load(open(os.path.join(run_dir, "preprocess", "manifest.json")))
    return manifest["wall_time_s"], cpu, manifest["stats"], manifest["outputs"]


def _tree_cpu(cmd: list[str]) -> float:
    """Run `cmd`; the CPU seconds it and every process under it (the local Ray node, its workers) spent,
    sampled every 0.2 s (a process's last moments before it exits may be missed). Ray's worker processes
    are not reaped into this process's rusage, so they are read while they live."""
    import psutil

    proc = psutil.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen: dict[tuple[int, float], float] = {}
    while proc.poll() is None:
        for p in [proc, *proc.children(recursive=True)]:
            try:
                t = p.cpu_times()
                seen[p.pid, p.create_time()] = t.user + t.system
            except psutil.Error:
                pass
        time.sleep(0.2)
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    return sum(seen.values())


def slice_dump(path: str, mb: float, folder: str) -> str:
    """The first `mb` MB of XML of the single-stream dump as a dump of its own (one bzip2 stream)."""
    out = os.path.join(folder, f"enwiki-slice-{mb:g}mb.xml.bz2")
    if os.path.exists(out):
        return out
    os.makedirs(folder, exist_ok=True)
    head, pages = _gensim_pages()
    xml, n = bytearray(head), 10
    while len(xml) < mb * MB:
        for page in pages:
            xml += _ID.sub(b"<id>%d</id>" % n, page, count=1) + b"\n  "
            n += 1
    with open(out + ".tmp", "wb") as f:
        f.write(bz2.compress(bytes(xml) + b"</mediawiki>\n"))
    os.replace(out + ".tmp", out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mb", type=float, default=200, help="MB of XML in the reader benchmark's dump")
    ap.add_argument("--stage-mb", type=float, default=6,
                    help="MB of XML of the smaller end-to-end slice (the larger is 3x)")
    ap.add_argument("--unit-mb", type=float, default=4, help="read_unit_mb (compressed MB per read unit)")
    ap.add_argument("--stage-only", action="store_true",
                    help="only the end-to-end stage rows (no reader rows; the estimate's reading column is omitted)")
    args = ap.parse_args()
    started = time.perf_counter()
    print(f"load average at start: {os.getloadavg()}", flush=True)
    t = time.perf_counter()
    # the stage's slices are cut from the gensim pages themselves: --stage-only needs no big dump
    single, multi = ("", "") if args.stage_only else build(args.size_mb, os.path.join(CACHE, f"{args.size_mb:g}mb"))
    xml_mb = args.size_mb
    print(f"dumps ready in {time.perf_counter() - t:.0f} s", flush=True)
    rows: list[tuple[str, str]] = []
    rates = {}
    for name, path in () if args.stage_only else (("single-stream", single), ("multistream + index", multi)):
        size = os.path.getsize(path) / MB
        one, digests1, docs, units1, cpu = read_with(path, 1, 1e6)
        rates[name] = xml_mb / cpu
        rows.append((f"{name} dump ({size:.0f} MB bz2, ~{xml_mb:.0f} MB XML, {docs:,} articles): 1 reader, 1 unit",
                     f"{one:.1f} s, {cpu:.1f} CPU s: {size / cpu:.2f} MB/s bz2, {xml_mb / cpu:.1f} MB/s XML per CPU "
                     f"second ({xml_mb / one:.1f} MB/s XML wall)"))
        t1, d1, _, units, _ = read_with(path, 1, args.unit_mb)
        t2, d2, _, _, _ = read_with(path, 2, args.unit_mb)
        same = d1 == d2 == digests1  # every document once, in order, in the same window
        rows.append((f"  {units} units of {args.unit_mb:g} MB: 1 reader / 2 readers",
                     f"{t1:.1f} s / {t2:.1f} s: speed-up {t1 / t2:.2f}x; documents identical: {same}"))
        print(rows[-2], rows[-1], sep="\n", flush=True)
    # The stage's per-byte rate is the slope between two slice sizes: Ray's start, the tokenizer's
    # training and the actors' start cost the same at both and drop out.
    small, large = slice_dump(single, args.stage_mb, CACHE), slice_dump(single, 3 * args.stage_mb, CACHE)
    runs = os.path.join(CACHE, "stage-runs")
    subprocess.run(["rm", "-rf", runs])
    walls, cpus, outs = {}, {}, {}
    for workers in (1, 2):
        for label, path in (("small", small), ("large", large)):
            walls[workers, label], cpus[workers, label], stats, outs[workers, label] = stage(
                path, workers, os.path.join(runs, f"w{workers}-{label}"), 1)
            if label == "large":
                units_large, tokens_large = stats["read_units"], stats["tokens"]
        print(f"stage runs with {workers} worker(s): {walls[workers, 'small']:.1f} s, {walls[workers, 'large']:.1f} s",
              flush=True)
    extra_mb = 2 * args.stage_mb
    slope = {w: walls[w, "large"] - walls[w, "small"] for w in (1, 2)}
    cpu_slope = {w: cpus[w, "large"] - cpus[w, "small"] for w in (1, 2)}
    # CPU seconds per MB are what another machine's load changes least: the estimate uses them
    e2e = extra_mb / cpu_slope[2] if cpu_slope[2] > 0 else float("nan")
    same = outs[1, "small"] == outs[2, "small"] and outs[1, "large"] == outs[2, "large"]

    def rate(mb: float, seconds: float) -> str:
        return f"{mb / seconds:.2f} MB/s" if seconds > 0 else "n/a (the larger run was not slower: load)"

    rows += [(f"end to end, the preprocess stage (`pofa run`) on {args.stage_mb:g} and {3 * args.stage_mb:g} MB XML "
              f"slices ({units_large} read units, {tokens_large:,} tokens in the larger): 1 worker",
              f"{walls[1, 'small']:.1f} s and {walls[1, 'large']:.1f} s of stage, {cpus[1, 'small']:.0f} and "
              f"{cpus[1, 'large']:.0f} CPU s: {rate(extra_mb, slope[1])} XML wall, {rate(extra_mb, cpu_slope[1])} "
              f"per CPU second on the {extra_mb:g} MB between them"),
             ("  2 workers", f"{walls[2, 'small']:.1f} s and {walls[2, 'large']:.1f} s of stage, {cpus[2, 'small']:.0f} and "
              f"{cpus[2, 'large']:.0f} CPU s: {rate(extra_mb, 2 * slope[2])} XML per core (wall), "
              f"{rate(extra_mb, cpu_slope[2])} per CPU second; speed-up {slope[1] / slope[2] if slope[2] > 0 else float('nan'):.2f}x "
              f"on the slope, {walls[1, 'large'] / walls[2, 'large']:.2f}x on the larger slice; "
              f"output files identical to 1 worker's: {same}")]
    width = max(len(k) for k, _ in rows)
    print(f"\n| {'measure'.ljust(width)} | value |\n|{'-' * (width + 2)}|---|")
    for k, v in rows:
        print(f"| {k.ljust(width)} | {v} |")
    print("\nFull English Wikipedia (~100 GB of XML, ~22 GB bz2), one reader per core, every core busy:")
    print("| cores | reading only (single-stream CPU rate) | end to end (2-worker CPU rate per core) |\n|---|---|---|")
    for cores in (8, 32, 64):
        reading = f"{100_000 / (rates['single-stream'] * cores) / 60:.1f} min" if rates else "-"
        print(f"| {cores} | {reading} | "
              f"{100_000 / (e2e * cores) / 60:.1f} min |")
    print(f"\nload average at end: {os.getloadavg()}; wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
