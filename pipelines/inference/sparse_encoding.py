"""A compressed sparse encoding of a state dict: per tensor, a bitmask of its non-zero entries
(`numpy.packbits`) plus those entries, or the raw bytes where that is smaller; the whole payload
zlib-compressed. Bit-exact: entries are compared as raw bytes, so -0.0, NaN and every dtype
(bf16, int8, ...) come back as they were. Standard library and numpy only.

File layout: MAGIC, an 8-byte little-endian header length, the header (JSON: one entry per tensor),
then the zlib stream of every tensor's parts in header order.
"""
from __future__ import annotations

import json
import os
import struct
import zlib
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from torch import Tensor

MAGIC = b"POFASPZ1"
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _raw(t: Tensor) -> np.ndarray:
    """The tensor's bytes as unsigned integers of its element width (1-D)."""
    flat = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return flat.view(_UINT[t.element_size()]) if t.element_size() in _UINT else flat


def _encode(t: Tensor) -> tuple[dict[str, Any], list[bytes]]:
    entry: dict[str, Any] = {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
    raw = _raw(t)
    n, width = t.numel(), t.element_size()
    if width in _UINT and n:
        keep = raw != 0
        nnz = int(keep.sum())
        if (n + 7) // 8 + nnz * width < n * width:
            entry.update(encoding="bitmask", nnz=nnz)
            return entry, [np.packbits(keep).tobytes(), raw[keep].tobytes()]
    entry["encoding"] = "dense"
    return entry, [raw.tobytes()]


def save_sparse(state: Mapping[str, Tensor], path: str, level: int = 6) -> int:
    """Write `state` to `path`; returns the file size in bytes."""
    header, parts = [], []
    for name, t in state.items():
        entry, chunks = _encode(t)
        entry["name"] = name
        entry["sizes"] = [len(c) for c in chunks]
        header.append(entry)
        parts.append(chunks)
    head = json.dumps(header).encode()
    tmp = path + ".tmp"
    comp = zlib.compressobj(level)
    with open(tmp, "wb") as f:
        f.write(MAGIC + struct.pack("<Q", len(head)) + head)
        for chunks in parts:
            for c in chunks:
                f.write(comp.compress(c))
        f.write(comp.flush())
    os.replace(tmp, path)
    return os.path.getsize(path)


def _chunks(data: bytes, sizes: list[int], offset: int) -> Iterator[bytes]:
    for s in sizes:
        yield data[offset:offset + s]
        offset += s


def load_sparse(path: str) -> dict[str, Tensor]:
    """The state dict `save_sparse` wrote, bit for bit."""
    with open(path, "rb") as f:
        if f.read(len(MAGIC)) != MAGIC:
            raise ValueError(f"{path}: not a pofa sparse encoding (bad magic)")
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
        data = zlib.decompress(f.read())
    out: dict[str, Tensor] = {}
    offset = 0
    for entry in header:
        dtype = getattr(torch, entry["dtype"])
        width = torch.empty((), dtype=dtype).element_size()
        n = int(np.prod(entry["shape"], dtype=np.int64))
        chunks = list(_chunks(data, entry["sizes"], offset))
        offset += sum(entry["sizes"])
        if entry["encoding"] == "bitmask":
            keep = np.unpackbits(np.frombuffer(chunks[0], dtype=np.uint8), count=n).astype(bool)
            raw = np.zeros(n, dtype=_UINT[width])
            raw[keep] = np.frombuffer(chunks[1], dtype=_UINT[width])
            buf = raw.tobytes()
        else:
            buf = chunks[0]
        flat = torch.frombuffer(bytearray(buf), dtype=torch.uint8) if buf else torch.empty(0, dtype=torch.uint8)
        out[entry["name"]] = flat.view(dtype).reshape(entry["shape"])
    if offset != len(data):
        raise ValueError(f"{path}: {len(data) - offset} bytes after the last tensor (a damaged file)")
    return out
