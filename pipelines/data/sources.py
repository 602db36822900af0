"""Streaming document readers for every source kind.

A source is cut into *read units* (one per file, or per dataset shard) fixed by the data alone, so the
shard layout, and with it every output byte, does not depend on how many workers process it.
Readers hold one document at a time: a 20 GB dump streams through in bounded memory.
"""
from __future__ import annotations

import bz2
import gzip
import io
import json
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import IO, Callable, Iterator

from pipelines.data.config import SourceConfig
from pipelines.data.documents import RawDocument, ReadPosition, SkipCounter, SourceError
from pipelines.data.paths import resolve_source_path


@dataclass(frozen=True)
class ReadUnit:
    index: int
    location: str  # a file path, or a dataset shard number for hf_dataset


def read_units(cfg: SourceConfig) -> list[ReadUnit]:
    if cfg.kind == "hf_dataset":
        return [ReadUnit(i, str(i)) for i in range(_hf_dataset(cfg).num_shards)]
    return [ReadUnit(i, f) for i, f in enumerate(cfg.files())]


def unit_size(cfg: SourceConfig, unit: ReadUnit) -> int:
    """What a unit weighs in the stage's progress: its file's bytes; a dataset shard counts as 1."""
    if cfg.kind == "hf_dataset":
        return 1
    try:
        return max(1, os.path.getsize(unit.location))
    except OSError:
        return 1


def iter_documents(cfg: SourceConfig, unit: ReadUnit, skipped: SkipCounter,
                   position: ReadPosition | None = None) -> Iterator[RawDocument]:
    """The unit's documents in order; `position`, when given, follows how far the reader is."""
    readers = {"wikipedia_xml": _iter_wikipedia_xml, "jsonl": _iter_jsonl, "parquet": _iter_parquet,
               "text": _iter_text, "hf_dataset": _iter_hf}
    yield from readers[cfg.kind](cfg, unit, skipped, position or ReadPosition())
    if position is not None:
        position.fraction = 1.0


class _Tell(io.RawIOBase):
    """Wraps a raw file to report the compressed byte offset in error messages."""

    def __init__(self, f: IO[bytes]):
        self.f = f

    def readinto(self, b):  # type: ignore[override]
        data = self.f.read(len(b))
        b[: len(data)] = data
        return len(data)

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.f.tell()


def _open(path: str) -> tuple[IO[bytes], IO[bytes]]:
    raw = open(path, "rb")
    if path.endswith(".bz2"):
        return raw, bz2.BZ2File(raw)
    if path.endswith(".gz"):
        return raw, gzip.GzipFile(fileobj=raw)
    return raw, raw


def _follow(raw: IO[bytes], position: ReadPosition) -> Callable[[], None]:
    """Updates `position` from the raw file's offset (buffered ahead by the decompressor: close enough)."""
    size = os.fstat(raw.fileno()).st_size

    def update() -> None:
        if size:
            position.fraction = min(1.0, raw.tell() / size)
    return update


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _iter_wikipedia_xml(cfg: SourceConfig, unit: ReadUnit, skipped: SkipCounter,
             position: ReadPosition) -> Iterator[RawDocument]:
    path = unit.location
    raw, stream = _open(path)
    update = _follow(raw, position)
    pages = 0
    try:
        context = ET.iterparse(stream, events=("start", "end"))
        _, root = next(context)
        page: dict[str, str] = {}
        for event, elem in context:
            if event != "end":
                continue
            tag = _local(elem.tag)
            if tag in ("title", "ns", "text") or (tag == "id" and "id" not in page):
                page[tag] = elem.text or ""
            elif tag == "redirect":
                page["redirect"] = "1"
            elif tag == "page":
                pages += 1
                if page.get("ns", "0") != "0":
                    skipped.skip("non_article_namespace")
                elif "redirect" in page or page.get("text", "").lstrip().lower().startswith("#redirect"):
                    skipped.skip("redirect")
                else:
                    update()
                    yield RawDocument(page.get("id") or f"{os.path.basename(path)}:{pages}", page.get("title", ""),
                                      page.get("text", ""), "wikitext")
                page = {}
                root.clear()  # drop finished pages: memory stays bounded
    except (EOFError, OSError, ET.ParseError) as exc:
        raise SourceError(f"{path}: corrupt or truncated dump near compressed byte {raw.tell()} "
                          f"(after {pages} pages): {exc}") from exc
    finally:
        raw.close()


def _iter_jsonl(cfg: SourceConfig, unit: ReadUnit, skipped: SkipCounter,
             position: ReadPosition) -> Iterator[RawDocument]:
    raw, stream = _open(unit.location)
    update = _follow(raw, position)
    name = os.path.basename(unit.location)
    try:
        for lineno, line in enumerate(stream, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError:
                skipped.skip("undecodable")
                continue
            except json.JSONDecodeError:
                skipped.skip("malformed_record")
                continue
            doc = _from_record(cfg, record, f"{name}:{lineno}", skipped)
            if doc is not None:
                update()
                yield doc
    finally:
        raw.close()


def _from_record(cfg: SourceConfig, record: object, fallback_id: str, skipped: SkipCounter) -> RawDocument | None:
    if not isinstance(record, dict) or not isinstance(record.get(cfg.text_column), str):
        skipped.skip("malformed_record")
        return None
    doc_id = record.get(cfg.id_column) if cfg.id_column else None
    title = record.get(cfg.title_column) if cfg.title_column else None
    return RawDocument(str(doc_id) if doc_id is not None else fallback_id, str(title or ""), record[cfg.text_column],
                       "plain")


def _iter_parquet(cfg: SourceConfig, unit: ReadUnit, skipped: SkipCounter,
             position: ReadPosition) -> Iterator[RawDocument]:
    import pyarrow.parquet as pq

    name = os.path.basename(unit.location)
    pf = pq.ParquetFile(unit.location)
    rows = max(1, pf.metadata.num_rows)
    row = 0
    for batch in pf.iter_batches(batch_size=512):  # one record batch in memory at a time
        for record in batch.to_pylist():
            row += 1
            doc = _from_record(cfg, record, f"{name}:{row}", skipped)
            if doc is not None:
                position.fraction = row / rows
                yield doc


def _iter_text(cfg: SourceConfig, unit: ReadUnit, skipped: SkipCounter,
             position: ReadPosition) -> Iterator[RawDocument]:
    """One document per blank-line separated block; with `sentence_per_line` (the default) each of its lines
    is one sentence, so the block's lines travel newline-joined under markup "lines"."""
    raw, stream = _open(unit.location)
    update = _follow(raw, position)
    name = os.path.basename(unit.location)
    markup = "lines" if cfg.splits_lines else "plain"
    block: list[bytes] = []
    count = 0

    def flush() -> Iterator[RawDocument]:
        nonlocal count
        count += 1
        try:
            text = b"".join(block).decode("utf-8")
        except UnicodeDecodeError:
            skipped.skip("undecodable")
            return
        update()
        yield RawDocument(f"{name}:{count}", "", text, markup)

    try:
        for line in stream:
            if line.strip():
                block.append(line)
            elif block:
                yield from flush()
                block = []
        if block:
            yield from flush()
    finally:
        raw.close()


def _hf_dataset(cfg: SourceConfig):
    """The real loading code: a hub dataset by name/config, or a local folder (data files or save_to_disk)."""
    import datasets

    if cfg.path:
        local = resolve_source_path(cfg.path)
        ds = datasets.load_from_disk(local)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[cfg.split]
        return ds.to_iterable_dataset(num_shards=max(1, min(64, len(ds) // 10_000 or 1)))
    ds = datasets.load_dataset(cfg.name, cfg.config, split=cfg.split, revision=cfg.revision, streaming=True)
    return ds


def _iter_hf(cfg: SourceConfig, unit: ReadUnit, skipped: SkipCounter,
             position: ReadPosition) -> Iterator[RawDocument]:
    ds = _hf_dataset(cfg)
    shard = ds.shard(num_shards=ds.num_shards, index=int(unit.location))
    for row, record in enumerate(shard):
        doc = _from_record(cfg, record, f"{cfg.name or cfg.path}:{unit.location}:{row}", skipped)
        if doc is not None:
            yield doc
