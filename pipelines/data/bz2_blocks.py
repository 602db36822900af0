"""Reading a bzip2 file from any of its blocks, with no index and no pass over what comes before.

A bzip2 stream is a 4-byte header ("BZh1".."BZh9"), blocks that each start with the 48-bit magic
0x314159265359 at any *bit* offset, and an end-of-stream marker (0x177245385090, then the combined CRC).
A block can be decoded alone: its bits, moved to a byte boundary between a stream header and an
end-of-stream marker that carries the block's own CRC (the combined CRC of a one-block stream), make a
stream the standard `bz2` module (libbz2) decodes. So a reader may start at the first block at or after
any byte and stop at any block: the cut points are the blocks, fixed by the data alone.

`indexed_bzip2` (PyPI) was weighed for this: it decodes in parallel threads inside one process, but
seeking needs its index of decoded offsets, which is only known after decoding everything before the
seek point; here every reader is its own process and needs to start cold at a compressed offset.
"""
from __future__ import annotations

import bz2
import os
from dataclasses import dataclass
from typing import Iterator

BLOCK_MAGIC = 0x314159265359
EOS_MAGIC = 0x177245385090
_MASK48 = (1 << 48) - 1
_HEADER = int.from_bytes(b"BZh9", "big")  # level 9 admits blocks of every level
_CHUNK = 8 << 20  # compressed bytes scanned per read


class Bz2BlockError(ValueError):
    """A block that does not decode, or a stream that does not end: the file is damaged or truncated."""

    def __init__(self, message: str, byte: int = 0) -> None:
        super().__init__(message)
        self.byte = byte  # the compressed byte where the bad block begins


def _needles(magic: int) -> list[tuple[int, bytes]]:
    """(bit shift, the whole bytes the magic covers at that shift): 6 bytes at shift 0, else the 5 middle
    bytes of the 7 it touches (the partial first and last bytes are checked after a find)."""
    out = [(0, magic.to_bytes(6, "big"))]
    for shift in range(1, 8):
        out.append((shift, (magic << (8 - shift)).to_bytes(7, "big")[1:6]))
    return out


_NEEDLES = [(kind, shift, needle) for kind, magic in ((BLOCK_MAGIC, BLOCK_MAGIC), (EOS_MAGIC, EOS_MAGIC))
            for shift, needle in _needles(magic)]


def _markers_in(buf: bytes) -> list[tuple[int, int]]:
    """(bit offset in buf, magic) of every block or end-of-stream magic wholly inside `buf`, sorted."""
    found = []
    for magic, shift, needle in _NEEDLES:
        lead = 0 if shift == 0 else 1  # the needle starts this many bytes after the magic's first byte
        j = buf.find(needle)
        while j >= 0:
            i = j - lead
            if i >= 0 and i + (6 if shift == 0 else 7) <= len(buf):
                if shift == 0 or (int.from_bytes(buf[i:i + 7], "big") >> (8 - shift)) & _MASK48 == magic:
                    found.append((8 * i + shift, magic))
            j = buf.find(needle, j + 1)
    found.sort()
    return found


def iter_markers(fd: int, start_byte: int, chunk: int = _CHUNK) -> Iterator[tuple[int, int]]:
    """(absolute bit offset, magic) of each block and end-of-stream magic at or after `start_byte`, in
    file order, read `chunk` bytes at a time (a magic across two reads is found once)."""
    offset, tail, last = start_byte, b"", -1
    while True:
        data = os.pread(fd, chunk, offset)
        if not data:
            return
        buf, base = tail + data, offset - len(tail)
        for bit, magic in _markers_in(buf):
            absolute = 8 * base + bit
            if absolute > last:
                last = absolute
                yield absolute, magic
        tail, offset = buf[-7:], offset + len(data)


@dataclass(frozen=True)
class Block:
    start_bit: int  # where its magic begins
    end_bit: int  # where the next magic (a block's or the end of its stream's) begins

    def decode(self, fd: int) -> bytes:
        """The block's decompressed bytes; Bz2BlockError when they do not decode (CRC or data error)."""
        first, last = self.start_bit // 8, (self.end_bit + 7) // 8
        raw = os.pread(fd, last - first, first)
        n = self.end_bit - self.start_bit
        value = int.from_bytes(raw, "big") >> (8 * len(raw) - (self.start_bit - 8 * first) - n) & ((1 << n) - 1)
        crc = (value >> (n - 80)) & 0xFFFFFFFF  # the 32 bits after the 48-bit magic
        stream = (((_HEADER << n) | value) << 80) | (EOS_MAGIC << 32) | crc
        bits = 32 + n + 80
        stream <<= -bits % 8
        try:
            return bz2.decompress(stream.to_bytes((bits + 7) // 8, "big"))
        except (OSError, EOFError, ValueError) as exc:
            raise Bz2BlockError(f"the bzip2 block at compressed byte {first} (bit {self.start_bit}) does not "
                                f"decode: {exc}", first) from exc


def iter_blocks(fd: int, start_byte: int) -> Iterator[Block]:
    """The blocks that start at or after `start_byte`, in order. A block with no magic after it (the file
    ends inside a stream, with no end-of-stream marker) is a truncated file: Bz2BlockError."""
    current: int | None = None
    for bit, magic in iter_markers(fd, start_byte):
        if current is not None:
            yield Block(current, bit)
        current = bit if magic == BLOCK_MAGIC else None
    if current is not None:
        raise Bz2BlockError(f"the bzip2 stream is truncated: the block at compressed byte {current // 8} has no "
                            "end-of-stream marker after it", current // 8)
