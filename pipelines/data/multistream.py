"""Wikimedia's multistream dumps: independent bzip2 streams of 100 pages each, listed by an index.

The index (`…-multistream-index.txt.bz2` beside `…-multistream.xml.bz2`) has one line per page,
`offset:page_id:title`, where offset is the byte at which the page's stream starts. A reader may start at
any listed offset; the first stream (the site info) and a last one (the closing tag) are not listed.
"""
from __future__ import annotations

import bz2
import os
from dataclasses import dataclass
from typing import Iterator


@dataclass(frozen=True)
class IndexedStream:
    offset: int  # first byte of the stream in the dump
    first_id: str  # the page id of the index's first line at this offset
    pages: int  # how many index lines name this offset


def index_path(dump: str) -> str | None:
    """The index file Wikimedia publishes beside a multistream dump, if it is there."""
    folder, name = os.path.split(dump)
    if "-multistream" not in name or ".xml" not in name:
        return None
    base = name.replace("-multistream", "-multistream-index", 1).replace(".xml", ".txt", 1)
    for candidate in (base, base[:-4] if base.endswith(".bz2") else base + ".bz2"):
        path = os.path.join(folder, candidate)
        if os.path.isfile(path):
            return path
    return None


def is_index_file(path: str) -> bool:
    name = os.path.basename(path)
    return "-multistream-index" in name and ".txt" in name


def read_index(path: str) -> list[IndexedStream]:
    """The streams the index lists, in offset order; ValueError naming the line when it is not an index."""
    opener = bz2.open if path.endswith(".bz2") else open
    streams: list[IndexedStream] = []
    offset, first, count = -1, "", 0
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split(":", 2)
            try:
                at = int(parts[0])
                page = parts[1]
            except (ValueError, IndexError):
                raise ValueError(f"{path}:{lineno}: not a multistream index line: {line[:80]!r}") from None
            if at != offset:
                if at < offset:
                    raise ValueError(f"{path}:{lineno}: offsets go backwards ({offset} then {at})")
                if count:
                    streams.append(IndexedStream(offset, first, count))
                offset, first, count = at, page, 0
            count += 1
    if count:
        streams.append(IndexedStream(offset, first, count))
    return streams


def decode_streams(fd: int, start: int, end: int | None, chunk: int = 1 << 20) -> Iterator[tuple[bytes, int]]:
    """The decompressed bytes of the bzip2 streams filling the dump's bytes [start, end) (end None: to
    the end of the file), each piece with the compressed offset read so far. The range must hold whole
    streams: ValueError when a stream runs past `end`, is cut short, or is not where the range begins."""
    offset, stop = start, end if end is not None else os.fstat(fd).st_size
    decoder: bz2.BZ2Decompressor | None = None
    pending = b""
    while True:
        if not pending:
            if offset >= stop:
                break
            pending = os.pread(fd, min(chunk, stop - offset), offset)
            if not pending:
                break
            offset += len(pending)
        if decoder is None or decoder.eof:  # the next stream of the range
            decoder = bz2.BZ2Decompressor()
        try:
            out = decoder.decompress(pending)
        except OSError as exc:
            raise ValueError(f"no valid bzip2 stream at bytes {start}-{stop} ({exc})") from exc
        pending = decoder.unused_data if decoder.eof else b""
        if out:
            yield out, offset - len(pending)
    if decoder is None or not decoder.eof:
        raise ValueError(f"the bzip2 stream in bytes {start}-{stop} is cut short (no end-of-stream marker)")
