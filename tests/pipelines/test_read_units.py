"""Read units cut inside a file: every document read exactly once, in the same windows, whatever the unit
size; and damaged input (a wrong multistream index, a truncated bzip2 stream, a line that is not JSON)
fails clearly or is counted by name, never dropped or doubled in silence."""
from __future__ import annotations

import bz2
import json
import logging
import random

import pytest

from pipelines.data.config import SourceConfig
from pipelines.data.documents import SourceError
from pipelines.data.sources import iter_items, read_units

PAGE = ("<page>\n    <title>{title}</title>\n    <ns>{ns}</ns>\n    <id>{id}</id>\n{redirect}    <revision>\n"
        "      <id>9{id}</id>\n      <text xml:space=\"preserve\">{text}</text>\n    </revision>\n  </page>\n  ")
HEAD = '<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">\n  <siteinfo><sitename>T</sitename></siteinfo>\n  '
FOOT = "</mediawiki>\n"
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda &lt;page&gt; mu nu".split()


def _pages(n: int, seed: int = 0) -> list[str]:
    """Pages of very different lengths (some span many bzip2 blocks), with redirects and other namespaces."""
    rng = random.Random(seed)
    out = []
    for i in range(1, n + 1):
        words = rng.choice([5, 50, 400, 3000, 12000])
        text = " ".join(rng.choice(WORDS) + str(rng.randrange(10**6)) for _ in range(words))
        redirect = '    <redirect title="X" />\n' if i % 7 == 0 else ""
        out.append(PAGE.format(title=f"Page {i}", ns=4 if i % 11 == 0 else 0, id=i, redirect=redirect, text=text))
    return out


def _sequence(cfg: SourceConfig, window_bytes: int) -> list[tuple[int, str]]:
    """(window, document id or skip reason) of the whole source, unit after unit."""
    out = []
    for unit in read_units(cfg, window_bytes=window_bytes):
        for window, item in iter_items(cfg, unit):
            out.append((window, item if isinstance(item, str) else item.doc_id))
    return out


def _check_cuts(cfg: SourceConfig, window_bytes: int, sizes=(1e-6, 0.003, 0.01, 0.05, 1024)) -> list[tuple[int, str]]:
    """The same (window, item) sequence for every unit size; at least one size gives several units."""
    whole = _sequence(cfg.model_copy(update={"read_unit_mb": 1024}), window_bytes)
    counts = []
    for mb in sizes:
        c = cfg.model_copy(update={"read_unit_mb": mb})
        counts.append(len(read_units(c, window_bytes=window_bytes)))
        assert _sequence(c, window_bytes) == whole, f"read_unit_mb={mb}"
    assert max(counts) >= 4 and counts[-1] == 1, counts
    return whole


def test_single_stream_bz2_cut_at_blocks(tmp_path):
    pages = _pages(45)
    xml = (HEAD + "".join(pages) + FOOT).encode()
    path = tmp_path / "enwiki-pages-articles.xml.bz2"
    path.write_bytes(bz2.compress(xml, compresslevel=1))  # 100 kB blocks: many of them
    cfg = SourceConfig(kind="wikipedia_xml", path=str(path))
    whole = _check_cuts(cfg, window_bytes=20_000, sizes=(1e-6, 0.03, 0.1, 1024))
    ids = [x for _, x in whole if x not in ("redirect", "non_article_namespace")]
    assert ids == [str(i) for i in range(1, 46) if i % 7 and i % 11]  # each page once, in order
    assert len({w for w, _ in whole}) >= 4  # several windows: several shards per file
    assert [w for w, _ in whole] == sorted(w for w, _ in whole)


def test_real_gensim_dump_cut_at_blocks(wiki_dump):
    cfg = SourceConfig(kind="wikipedia_xml", path=wiki_dump)
    whole = _check_cuts(cfg, window_bytes=200_000, sizes=(0.2, 1024))
    assert sum(1 for _, x in whole if x not in ("redirect", "non_article_namespace")) == 106


def _multistream(tmp_path, pages: list[str], per_stream: int = 10) -> tuple[str, str, list[str]]:
    """A dump made as Wikimedia makes theirs: site info, streams of `per_stream` pages, the closing tag,
    and the index of `offset:id:title` lines."""
    blobs, lines, offset = [bz2.compress(HEAD.encode())], [], 0
    offset = len(blobs[0])
    for i in range(0, len(pages), per_stream):
        group = pages[i:i + per_stream]
        blob = bz2.compress("".join(group).encode())
        for p in group:
            pid = p.split("<id>")[1].split("<")[0]
            lines.append(f"{offset}:{pid}:Page {pid}")
        blobs.append(blob)
        offset += len(blob)
    blobs.append(bz2.compress(FOOT.encode()))
    dump = tmp_path / "xxwiki-20250101-pages-articles-multistream.xml.bz2"
    dump.write_bytes(b"".join(blobs))
    index = tmp_path / "xxwiki-20250101-pages-articles-multistream-index.txt.bz2"
    index.write_bytes(bz2.compress(("\n".join(lines) + "\n").encode()))
    return str(dump), str(index), lines


def test_multistream_cut_by_its_index(tmp_path):
    dump, index, _ = _multistream(tmp_path, _pages(60, seed=5), per_stream=5)
    cfg = SourceConfig(kind="wikipedia_xml", path=str(tmp_path))  # a folder: the index is not read as a dump
    units = read_units(cfg.model_copy(update={"read_unit_mb": 0.01}), window_bytes=10_000)
    assert {u.location for u in units} == {dump} and all(u.index_path == index for u in units)
    whole = _check_cuts(cfg, window_bytes=10_000, sizes=(1e-6, 0.02, 0.05, 1024))
    ids = [x for _, x in whole if x not in ("redirect", "non_article_namespace")]
    assert ids == [str(i) for i in range(1, 61) if i % 7 and i % 11]
    # without its index the same dump is read block by block: the same documents (in windows of the
    # blocks rather than of the streams, which is why the index is part of the source's identity)
    alone = tmp_path / "other"
    alone.mkdir()
    (alone / "dump.xml.bz2").write_bytes(open(dump, "rb").read())
    blocks = _sequence(SourceConfig(kind="wikipedia_xml", path=str(alone / "dump.xml.bz2"), read_unit_mb=0.01),
                       10_000)
    assert [x for _, x in blocks] == [x for _, x in whole]


def test_plain_xml_jsonl_and_text_cut_at_records(tmp_path):
    pages = _pages(30, seed=1)
    (tmp_path / "d.xml").write_text(HEAD + "".join(pages) + FOOT)
    _check_cuts(SourceConfig(kind="wikipedia_xml", path=str(tmp_path / "d.xml")), window_bytes=5_000)

    rng = random.Random(2)
    with open(tmp_path / "d.jsonl", "w") as f:
        for i in range(400):
            f.write(json.dumps({"id": f"r{i}", "text": "x " * rng.choice([1, 10, 300, 3000])}) + "\n")
            if i % 50 == 0:
                f.write("\n")  # blank lines are no records
    whole = _check_cuts(SourceConfig(kind="jsonl", path=str(tmp_path / "d.jsonl")), window_bytes=3_000)
    assert [x for _, x in whole] == [f"r{i}" for i in range(400)]

    lines = []
    for i in range(300):
        lines += [f"doc {i} line {j} " + "w " * rng.choice([1, 20, 500]) for j in range(rng.choice([1, 2, 8]))]
        lines.append(rng.choice(["", "   ", "\t", "", " \r"]))  # whitespace-only lines end a document too
    (tmp_path / "d.txt").write_text("\n".join(lines))
    cfg = SourceConfig(kind="text", path=str(tmp_path / "d.txt"))
    _check_cuts(cfg, window_bytes=2_000)
    docs = [d for u in read_units(cfg.model_copy(update={"read_unit_mb": 0.002}), window_bytes=2_000)
            for _, d in iter_items(cfg, u)]
    assert [d.text.split(" ", 2)[1] for d in docs] == [str(i) for i in range(300)]  # each block once, whole
    assert all(d.text.count(f"doc {d.text.split()[1]} line 0 ") == 1 for d in docs)


def test_parquet_cut_at_row_groups(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"document {i} " + "z" * (i % 97) * 50 for i in range(1000)]
    pq.write_table(pa.table({"text": texts}), tmp_path / "d.parquet", row_group_size=64)
    cfg = SourceConfig(kind="parquet", path=str(tmp_path / "d.parquet"), id_column=None)
    whole = _check_cuts(cfg, window_bytes=1)
    assert [x for _, x in whole] == [f"d.parquet:{i}" for i in range(1, 1001)]
    assert [w for w, _ in whole] == [i // 64 for i in range(1000)]  # the row group is the window


def test_compressed_text_and_capped_files_are_one_unit(tmp_path):
    import gzip

    (tmp_path / "d.jsonl.gz").write_bytes(gzip.compress(b"".join(
        json.dumps({"id": str(i), "text": "t " * 100}).encode() + b"\n" for i in range(500))))
    cfg = SourceConfig(kind="jsonl", path=str(tmp_path / "d.jsonl.gz"), read_unit_mb=1e-6)
    assert len(read_units(cfg, window_bytes=100)) == 1
    assert {w for w, _ in _sequence(cfg, 100)} == {0}
    (tmp_path / "p.jsonl").write_bytes(b"".join(json.dumps({"id": str(i), "text": "t"}).encode() + b"\n"
                                                for i in range(500)))
    capped = SourceConfig(kind="jsonl", path=str(tmp_path / "p.jsonl"), read_unit_mb=1e-6, max_documents=5)
    assert len(read_units(capped, window_bytes=100)) == 1


# -- bad input -------------------------------------------------------------------------------------------

def test_an_index_that_does_not_match_its_dump_fails_naming_both(tmp_path):
    dump, index, lines = _multistream(tmp_path, _pages(40, seed=6), per_stream=10)
    cfg = SourceConfig(kind="wikipedia_xml", path=dump, read_unit_mb=0.01)
    shifted = [f"{int(line.split(':')[0]) + 3}:{line.split(':', 1)[1]}" for line in lines]
    open(index, "wb").write(bz2.compress(("\n".join(shifted) + "\n").encode()))
    with pytest.raises(SourceError, match=r"multistream.xml.bz2: the stream at byte \d+ is not a whole bzip2 "
                                          r"stream of pages as the index .*-index.txt.bz2 says"):
        _sequence(cfg, 10_000)
    dropped = [line for line in lines if not line.startswith(lines[15].split(":")[0] + ":")]  # one stream unlisted
    open(index, "wb").write(bz2.compress(("\n".join(dropped) + "\n").encode()))
    with pytest.raises(SourceError, match=r"does not match the dump: the stream at byte \d+ holds 20 pages "
                                          r"\(first id 1\), the index lists 10 \(first id 1\)"):
        _sequence(cfg, 10_000)
    other = [line.replace(":11:", ":1100:") for line in lines]  # right offsets, another dump's pages
    open(index, "wb").write(bz2.compress(("\n".join(other) + "\n").encode()))
    with pytest.raises(SourceError, match=r"holds 10 pages \(first id 11\), the index lists 10 \(first id 1100\)"):
        _sequence(cfg, 10_000)


def test_a_truncated_stream_inside_a_file_fails_at_its_byte(tmp_path):
    xml = (HEAD + "".join(_pages(40, seed=3))).encode()
    first = bz2.compress(xml, compresslevel=1)
    cut = first[: len(first) * 2 // 3]  # a stream cut mid-block, and the file goes on with another stream
    path = tmp_path / "dump.xml.bz2"
    path.write_bytes(cut + bz2.compress(("".join(_pages(5, seed=4)) + FOOT).encode()))
    for mb in (1024, 0.01):
        cfg = SourceConfig(kind="wikipedia_xml", path=str(path), read_unit_mb=mb)
        with pytest.raises(SourceError, match=r"dump\.xml\.bz2: corrupt or truncated dump near compressed byte \d+"
                                              r".*bzip2 block at compressed byte \d+ .* does not decode"):
            _sequence(cfg, 10_000)
    # cut exactly at a block's end, with no end-of-stream marker: the pages after it are missing
    path.write_bytes(first[: len(first) // 2])
    with pytest.raises(SourceError, match=r"corrupt or truncated dump"):
        _sequence(SourceConfig(kind="wikipedia_xml", path=str(path), read_unit_mb=1024), 10_000)


def test_a_line_that_is_not_json_is_counted_once_and_named(tmp_path, caplog):
    records = [json.dumps({"id": f"r{i}", "text": "word " * 80}) for i in range(200)]
    records[120] = records[120][: len(records[120]) // 2]  # a torn line in the middle of the file
    (tmp_path / "d.jsonl").write_text("\n".join(records) + "\n")
    offset = sum(len(r) + 1 for r in records[:120])
    for mb in (1024, 0.001, 0.004):
        caplog.clear()
        cfg = SourceConfig(kind="jsonl", path=str(tmp_path / "d.jsonl"), read_unit_mb=mb)
        with caplog.at_level(logging.WARNING, logger="pofa.sources"):
            seq = _sequence(cfg, 1_000)
        assert [x for _, x in seq] == [f"r{i}" for i in range(120)] + ["malformed_record"] + [
            f"r{i}" for i in range(121, 200)]
        assert [r.getMessage().split(":")[0] for r in caplog.records] == [f"d.jsonl@{offset}"]
