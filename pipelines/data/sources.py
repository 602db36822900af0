"""Streaming document readers for every source kind, each reading one read unit.

A source is cut into read units fixed by the data alone (pipelines/data/units.py); a reader yields the
documents that begin inside its unit, each with its window (which decides its shard), and follows the
last one past the unit's end. Readers hold one document (one bzip2 block, one indexed stream) at a time:
a 20 GB dump streams through in bounded memory.
"""
from __future__ import annotations

import bz2
import gzip
import json
import logging
import os
import xml.etree.ElementTree as ET
from typing import IO, Callable, Iterator, Union

from pipelines.data.bz2_blocks import Bz2BlockError, iter_blocks
from pipelines.data.config import SourceConfig
from pipelines.data.documents import RawDocument, ReadPosition, SkipCounter, SourceError
from pipelines.data.multistream import decode_streams
from pipelines.data.paths import resolve_source_path
from pipelines.data.units import ReadUnit, read_units  # noqa: F401 - the readers' unit, re-exported
from pipelines.data.xml_pages import Piece, TruncatedPage, iter_pages, page_fields

logger = logging.getLogger("pofa.sources")

# What a reader yields: a document, or the reason one was skipped (counted in its window's shard).
Item = Union[RawDocument, str]
_PIECE = 1 << 20  # bytes per read of an uncompressed file


def unit_size(cfg: SourceConfig, unit: ReadUnit) -> int:
    """What a unit weighs in the stage's progress: its stored bytes; a dataset shard counts as 1."""
    return max(1, unit.size)


def iter_items(cfg: SourceConfig, unit: ReadUnit, position: ReadPosition | None = None
               ) -> Iterator[tuple[int, Item]]:
    """(window, document or skip reason) for every document that begins inside the unit, in order."""
    readers: dict[str, Callable[..., Iterator[tuple[int, Item]]]] = {
        "wikipedia_xml": _iter_wikipedia_xml, "jsonl": _iter_jsonl, "parquet": _iter_parquet,
        "text": _iter_text, "hf_dataset": _iter_hf}
    position = position if position is not None else ReadPosition()
    yield from readers[cfg.kind](cfg, unit, position)
    position.fraction = 1.0


def iter_documents(cfg: SourceConfig, unit: ReadUnit, skipped: SkipCounter,
                   position: ReadPosition | None = None) -> Iterator[RawDocument]:
    """The unit's documents in order, skips counted in `skipped`; `position` follows how far it is."""
    for _, item in iter_items(cfg, unit, position):
        if isinstance(item, str):
            skipped.skip(item)
        else:
            yield item


def _span(unit: ReadUnit, path: str) -> tuple[int, int]:
    end = unit.end if unit.end is not None else os.path.getsize(path)
    return unit.start, max(end, unit.start + 1)


def _open(path: str) -> IO[bytes]:
    if path.endswith(".bz2"):
        return bz2.BZ2File(path)
    if path.endswith(".gz"):
        return gzip.GzipFile(path)
    return open(path, "rb")


# -- Wikipedia XML ---------------------------------------------------------------------------------------

def _iter_wikipedia_xml(cfg: SourceConfig, unit: ReadUnit, position: ReadPosition) -> Iterator[tuple[int, Item]]:
    path = unit.location
    name = os.path.basename(path)
    if unit.index_path:
        yield from _iter_multistream(unit, position)
        return
    if path.endswith(".bz2"):
        pieces = _block_pieces(unit, position)
    elif path.endswith((".gz", ".xz", ".zst")):
        pieces = _whole_pieces(path)
    else:
        pieces = _plain_pieces(unit, position)
    n, in_window, window = 0, 0, -1
    try:
        for piece, page in iter_pages(pieces):
            n += 1
            # a unit starts at a window's start, so a page's place in its window is fixed by the data
            in_window = in_window + 1 if piece.window == window else 1
            window = piece.window
            yield piece.window, _page_item(page, f"{name}:{piece.window}:{in_window}")
    except (Bz2BlockError, TruncatedPage, EOFError, OSError, ET.ParseError) as exc:
        start, end = _span(unit, path)
        near = exc.byte if isinstance(exc, Bz2BlockError) else int(start + position.fraction * (end - start))
        raise SourceError(f"{path}: corrupt or truncated dump near compressed byte {near} (after {n} pages of "
                          f"the read unit from byte {unit.start}): {exc}") from exc


def _page_item(page: bytes, fallback_id: str) -> Item:
    fields = page_fields(page)
    if fields.get("ns", "0") != "0":
        return "non_article_namespace"
    if "redirect" in fields or fields.get("text", "").lstrip()[:9].lower() == "#redirect":  # not the whole text
        return "redirect"
    return RawDocument(fields.get("id") or fallback_id, fields.get("title", ""), fields.get("text", ""), "wikitext")


def _block_pieces(unit: ReadUnit, position: ReadPosition) -> Iterator[Piece]:
    """The unit's bzip2 blocks (those starting in it), then the next ones while a page is unfinished."""
    start, end = _span(unit, unit.location)
    fd = os.open(unit.location, os.O_RDONLY)
    try:
        if start == 0 and os.pread(fd, 3, 0) != b"BZh":
            raise Bz2BlockError("not a bzip2 file (no BZh header)")
        for block in iter_blocks(fd, start):
            byte = block.start_bit // 8
            position.fraction = min(1.0, (block.end_bit // 8 - start) / (end - start))
            yield Piece(unit.window(byte), byte < end, block.decode(fd), position.fraction)
    finally:
        os.close(fd)


def _plain_pieces(unit: ReadUnit, position: ReadPosition) -> Iterator[Piece]:
    """An uncompressed dump's bytes from the unit's start, one window at most per piece."""
    start, end = _span(unit, unit.location)
    with open(unit.location, "rb") as f:
        offset = start
        while True:
            window = unit.window(offset)
            f.seek(offset)
            data = f.read(min(_PIECE, (window + 1) * unit.window_bytes - offset))
            if not data:
                return
            position.fraction = min(1.0, (offset + len(data) - start) / (end - start))
            yield Piece(window, offset < end, data, position.fraction)
            offset += len(data)


def _whole_pieces(path: str) -> Iterator[Piece]:
    """A file no reader can enter in the middle: one unit, window 0."""
    with _open(path) as f:
        for data in iter(lambda: f.read(_PIECE), b""):
            yield Piece(0, True, data, 0.0)


def _iter_multistream(unit: ReadUnit, position: ReadPosition) -> Iterator[tuple[int, Item]]:
    """The unit's indexed streams, each checked against the index before its pages go out: a stream
    must hold exactly the pages the index lists for it, beginning with the listed page id."""
    path, index = unit.location, unit.index_path
    start, end = _span(unit, path)
    segments: list[tuple[int, int | None, str | None, int]] = []  # (offset, end, first id, pages)
    offsets = [s[0] for s in unit.streams]
    if unit.start == 0:  # the site-info stream before the first listed one holds no page
        segments.append((0, offsets[0] if offsets else unit.streams_end, None, 0))
    for i, (offset, first_id, pages) in enumerate(unit.streams):
        segments.append((offset, offsets[i + 1] if i + 1 < len(offsets) else unit.streams_end, first_id, pages))
    fd = os.open(path, os.O_RDONLY)
    try:
        for offset, stop, first_id, expected in segments:
            try:
                data = b"".join(out for out, _ in decode_streams(fd, offset, stop))
                pages = [page for _, page in iter_pages(iter([Piece(unit.window(offset), True, data, 0.0)]))]
            except ValueError as exc:  # TruncatedPage too: a page across two listed streams
                raise SourceError(f"{path}: the stream at byte {offset} is not a whole bzip2 stream of pages "
                                  f"as the index {index} says (does the index belong to this dump?): {exc}") from exc
            try:
                items = [_page_item(page, f"{os.path.basename(path)}@{offset}:{n}") for n, page in enumerate(pages)]
            except ET.ParseError as exc:
                raise SourceError(f"{path}: a corrupt page in the stream at byte {offset}: {exc}") from exc
            got_first = page_fields(pages[0]).get("id") if pages else None
            if len(pages) != expected or (first_id is not None and got_first != first_id):
                raise SourceError(
                    f"{path}: the multistream index {index} does not match the dump: the stream at byte "
                    f"{offset} holds {len(pages)} pages (first id {got_first}), the index lists {expected}"
                    + (f" (first id {first_id})" if first_id is not None else ""))
            position.fraction = min(1.0, ((stop or os.fstat(fd).st_size) - start) / (end - start))
            for item in items:
                yield unit.window(offset), item
    finally:
        os.close(fd)


# -- JSON Lines and text ---------------------------------------------------------------------------------

def _lines(cfg: SourceConfig, unit: ReadUnit, position: ReadPosition
           ) -> Iterator[tuple[int, bytes, bool]]:
    """(offset, line, owned) from the first line beginning inside the unit; lines beginning after its end
    come with owned False (a text document may run on). A compressed file: decompressed offsets."""
    path = unit.location
    if unit.end is None and unit.start == 0 and path.endswith((".bz2", ".gz", ".xz", ".zst")):
        with _open(path) as stream:
            offset = 0
            for line in stream:
                yield offset, line, True
                offset += len(line)
        return
    start, end = _span(unit, path)
    with open(path, "rb") as f:
        offset = start
        if start > 0:  # a line begins here only after a newline; else at the next one
            f.seek(start - 1)
            if f.read(1) != b"\n":
                offset += len(f.readline())
        f.seek(offset)
        for line in f:
            position.fraction = min(1.0, (offset + len(line) - start) / (end - start))
            yield offset, line, offset < end
            offset += len(line)


def _iter_jsonl(cfg: SourceConfig, unit: ReadUnit, position: ReadPosition) -> Iterator[tuple[int, Item]]:
    name = os.path.basename(unit.location)
    for offset, line, owned in _lines(cfg, unit, position):
        if not owned:
            return
        if not line.strip():
            continue
        window = _window_of(unit, offset)
        try:
            record = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            logger.warning("%s@%d: a line that is not UTF-8, skipped (undecodable)", name, offset)
            yield window, "undecodable"
            continue
        except json.JSONDecodeError as exc:
            logger.warning("%s@%d: a line that is not valid JSON, skipped (malformed_record): %s", name, offset, exc)
            yield window, "malformed_record"
            continue
        yield window, _from_record(cfg, record, f"{name}@{offset}")


def _window_of(unit: ReadUnit, offset: int) -> int:
    """Offsets of a compressed file are decompressed ones: the whole file is window 0."""
    return 0 if unit.location.endswith((".bz2", ".gz", ".xz", ".zst")) else unit.window(offset)


def _from_record(cfg: SourceConfig, record: object, fallback_id: str) -> Item:
    if not isinstance(record, dict) or not isinstance(record.get(cfg.text_column), str):
        return "malformed_record"
    doc_id = record.get(cfg.id_column) if cfg.id_column else None
    title = record.get(cfg.title_column) if cfg.title_column else None
    return RawDocument(str(doc_id) if doc_id is not None else fallback_id, str(title or ""), record[cfg.text_column],
                       "plain")


def _previous_line_blank(path: str, offset: int) -> bool:
    """Whether the line ending just before `offset` (a line start) holds only whitespace."""
    if offset == 0:
        return True
    with open(path, "rb") as f:
        at = offset - 1  # the newline ending that line
        while at > 0:
            back = max(0, at - 4096)
            f.seek(back)
            chunk = f.read(at - back)
            rest = chunk.rsplit(b"\n", 1)
            if rest[-1].strip():
                return False
            if len(rest) == 2:
                return True
            at = back
        return True


def _iter_text(cfg: SourceConfig, unit: ReadUnit, position: ReadPosition) -> Iterator[tuple[int, Item]]:
    """One document per blank-line separated block, owned by the unit where its first line begins; with
    `sentence_per_line` (the default) each of its lines is one sentence, so the block's lines travel
    newline-joined under markup "lines"."""
    name = os.path.basename(unit.location)
    markup = "lines" if cfg.splits_lines else "plain"
    block: list[bytes] = []
    begun = 0
    prev_blank: bool | None = None  # known once the first line is seen

    def flush() -> tuple[int, Item]:
        window = _window_of(unit, begun)
        try:
            return window, RawDocument(f"{name}@{begun}", "", b"".join(block).decode("utf-8"), markup)
        except UnicodeDecodeError:
            return window, "undecodable"

    for offset, line, owned in _lines(cfg, unit, position):
        if not owned and not block:
            return  # past the unit, no document of its own open: the rest is the next unit's
        if prev_blank is None:
            prev_blank = unit.end is None and unit.start == 0 or _previous_line_blank(unit.location, offset)
        if not line.strip():
            if block:
                yield flush()
                block = []
            prev_blank = True
            continue
        if prev_blank:  # a document begins here
            if not owned:
                return
            block, begun = [line], offset
        elif block:
            block.append(line)
        prev_blank = False  # a line of a document begun before the unit is not this unit's
    if block:
        yield flush()


# -- Parquet and Hugging Face datasets -------------------------------------------------------------------

def _iter_parquet(cfg: SourceConfig, unit: ReadUnit, position: ReadPosition) -> Iterator[tuple[int, Item]]:
    import pyarrow.parquet as pq

    name = os.path.basename(unit.location)
    pf = pq.ParquetFile(unit.location)
    meta = pf.metadata
    groups = range(unit.start, unit.end if unit.end is not None else meta.num_row_groups)
    row = sum(meta.row_group(g).num_rows for g in range(unit.start))  # ids count rows from the file's start
    rows = max(1, sum(meta.row_group(g).num_rows for g in groups))
    done = 0
    for g in groups:
        for batch in pf.iter_batches(batch_size=512, row_groups=[g]):  # one record batch in memory at a time
            for record in batch.to_pylist():
                row += 1
                done += 1
                position.fraction = done / rows
                yield g, _from_record(cfg, record, f"{name}:{row}")


def hf_dataset(cfg: SourceConfig):
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


def _iter_hf(cfg: SourceConfig, unit: ReadUnit, position: ReadPosition) -> Iterator[tuple[int, Item]]:
    ds = hf_dataset(cfg)
    shard = ds.shard(num_shards=ds.num_shards, index=int(unit.location))
    for row, record in enumerate(shard):
        yield 0, _from_record(cfg, record, f"{cfg.name or cfg.path}:{unit.location}:{row}")
