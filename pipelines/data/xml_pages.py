"""MediaWiki export XML as a run of `<page>…</page>` elements, read from any point of the dump.

A page begins at the `<` of its `<page>` tag: markup is the only place that string can appear, since
text content escapes `<`. A reader that starts inside the dump skips to the first page beginning in its
part, and reads past its end to finish the last page that began inside it.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Iterator

_OPEN, _CLOSE = b"<page>", b"</page>"


@dataclass(frozen=True)
class Piece:
    """Decompressed bytes in dump order: the window they belong to, whether pages beginning in them are
    the reader's own (False: read only to finish a page), and how far through its unit the reader is."""
    window: int
    own: bool
    data: bytes
    fraction: float
    tag: int = 0  # which segment (e.g. which indexed stream) the bytes came from


class TruncatedPage(ValueError):
    """The bytes ended inside a page."""


def iter_pages(pieces: Iterator[Piece]) -> Iterator[tuple[Piece, bytes]]:
    """(the piece the page begins in, the page's bytes) of every page beginning in an own piece, in order.
    Stops reading once a page begins outside the own pieces, or a page ends inside an overflow piece."""
    buf, base = b"", 0  # unconsumed bytes and the offset of buf[0] in the reader's decompressed output
    starts: list[tuple[int, Piece]] = []  # (offset where each piece begins, piece), the ones buf still holds
    open_at: int | None = None  # buf index of a page begun and not ended
    for piece in pieces:
        starts.append((base + len(buf), piece))
        buf += piece.data
        pos = 0
        while True:
            if open_at is None:
                i = buf.find(_OPEN, pos)
                if i < 0:
                    if not piece.own:
                        return  # any page beginning later begins outside the unit
                    keep = max(pos, len(buf) - len(_OPEN) + 1)  # a tag may straddle two pieces
                    buf, base = buf[keep:], base + keep
                    break
                owner = _owner(starts, base + i)
                if not owner.own:
                    return
                open_at = i
            j = buf.find(_CLOSE, open_at + len(_OPEN))
            if j < 0:
                buf, base, open_at = buf[open_at:], base + open_at, 0
                break
            yield _owner(starts, base + open_at), buf[open_at:j + len(_CLOSE)]
            pos, open_at = j + len(_CLOSE), None
        while len(starts) > 1 and starts[1][0] <= base:
            starts.pop(0)
    if open_at is not None:
        raise TruncatedPage(f"the dump ends inside a page ({len(buf)} bytes after its <page> tag)")


def _owner(starts: list[tuple[int, Piece]], offset: int) -> Piece:
    for begin, piece in reversed(starts):
        if begin <= offset:
            return piece
    return starts[0][1]


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def page_fields(page: bytes) -> dict[str, str]:
    """title, ns, id (the page's, not a revision's), text and redirect of one `<page>` element;
    ET.ParseError when it is not well-formed."""
    out: dict[str, str] = {}
    for elem in ET.fromstring(page).iter():
        tag = _local(elem.tag)
        if tag in ("title", "ns", "text") or (tag == "id" and "id" not in out):
            out[tag] = elem.text or ""
        elif tag == "redirect":
            out["redirect"] = "1"
    return out
