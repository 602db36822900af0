"""Cutting a source into read units, and the windows that fix the shard layout.

Two grids, both fixed by the data alone:
- *windows* (`WINDOW_BYTES` of a file's stored bytes; a Parquet row group): a document belongs to the
  window where it begins (its bzip2 block or stream, its first byte, its row group). Shards are cut per
  window, so the shard layout, and with it every output byte, does not depend on the read units.
- *read units*: runs of whole windows of about `source.read_unit_mb` each, read by one reader task. A
  unit reads the documents that begin inside it and follows the last one past its end: every document
  is read exactly once, whatever the unit size or the worker count.
A file that cannot be entered in the middle (gzip, compressed JSON Lines or text) or whose documents are
capped (`max_documents`, counted from the file's start) is one unit.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Optional

from pipelines.data.config import SourceConfig
from pipelines.data.multistream import index_path, is_index_file, read_index

WINDOW_BYTES = 1_000_000  # 22k windows in a 22 GB dump: shards of a few hundred articles
_COMPRESSED = (".bz2", ".gz", ".xz", ".zst")


@dataclass(frozen=True)
class ReadUnit:
    index: int
    location: str  # a file path, or a dataset shard number for hf_dataset
    file: int = 0  # the file's place in the source: shard ids start with it
    start: int = 0  # the first stored byte of the file it reads from (Parquet: the first row group)
    end: Optional[int] = None  # where the next unit starts; None: the end of the file
    size: int = 1  # stored bytes it covers (a dataset shard: 1): its weight in the stage's progress
    window_bytes: int = WINDOW_BYTES
    # a multistream dump: its index, and the listed streams in [start, end) as (offset, first page id,
    # pages), and where the last of them ends (the next listed offset; None: the end of the file)
    index_path: Optional[str] = None
    streams: tuple[tuple[int, str, int], ...] = ()
    streams_end: Optional[int] = None

    def window(self, offset: int) -> int:
        return offset // self.window_bytes

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "ReadUnit":
        data = json.loads(text)
        data["streams"] = tuple(tuple(s) for s in data.get("streams", ()))
        return cls(**data)


def cuttable(cfg: SourceConfig, path: str) -> bool:
    """Whether a reader can start inside this file at a record boundary."""
    if cfg.max_documents is not None:
        return False
    if cfg.kind == "wikipedia_xml" and path.endswith(".bz2"):
        return True
    return not path.endswith(_COMPRESSED)


def source_files(cfg: SourceConfig) -> list[str]:
    """The files that hold documents: a multistream dump's index, listed by a folder or glob, is not one."""
    files = cfg.files()
    if cfg.kind == "wikipedia_xml":
        files = [f for f in files if not is_index_file(f)]
    return files


def unit_bytes(cfg: SourceConfig) -> int:
    return max(1, round(cfg.read_unit_mb * 1_000_000))


def cut_file(cfg: SourceConfig, file: int, path: str, first_index: int,
             window_bytes: int = WINDOW_BYTES) -> list[ReadUnit]:
    size = os.path.getsize(path)
    if cfg.kind == "parquet":
        return _parquet_units(cfg, file, path, first_index)
    if not cuttable(cfg, path):
        return [ReadUnit(first_index, path, file, 0, None, max(1, size), window_bytes)]
    per_unit = max(1, -(-unit_bytes(cfg) // window_bytes)) * window_bytes
    bounds = list(range(0, max(size, 1), per_unit)) + [size]
    units = [ReadUnit(first_index + i, path, file, a, b if b < size else None, max(1, b - a), window_bytes)
             for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]
    index = index_path(path) if path.endswith(".bz2") and cfg.kind == "wikipedia_xml" else None
    return _with_streams(units, index) if index else units


def _with_streams(units: list[ReadUnit], index: str) -> list[ReadUnit]:
    """Each unit gets the index's streams that start inside it (a unit holding none reads nothing but,
    at the file's start, the site-info stream before the first listed one)."""
    streams = read_index(index)
    offsets = [s.offset for s in streams]
    out, i = [], 0
    for unit in units:
        mine = []
        while i < len(streams) and (unit.end is None or streams[i].offset < unit.end):
            mine.append((streams[i].offset, streams[i].first_id, streams[i].pages))
            i += 1
        out.append(ReadUnit(unit.index, unit.location, unit.file, unit.start, unit.end, unit.size,
                            unit.window_bytes, index, tuple(mine),
                            offsets[i] if i < len(offsets) else None))
    return out


def _parquet_units(cfg: SourceConfig, file: int, path: str, first_index: int) -> list[ReadUnit]:
    """Runs of whole row groups of about `read_unit_mb` compressed; the row group is the window."""
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    sizes = [max(1, sum(group.column(c).total_compressed_size for c in range(group.num_columns)))
             for group in (meta.row_group(g) for g in range(meta.num_row_groups))]
    if cfg.max_documents is not None or not sizes:
        return [ReadUnit(first_index, path, file, 0, None, max(1, sum(sizes)), 1)]
    units, start, weight, limit = [], 0, 0, unit_bytes(cfg)
    for g, size in enumerate(sizes):
        weight += size
        if weight >= limit or g == len(sizes) - 1:
            end = g + 1 if g + 1 < len(sizes) else None
            units.append(ReadUnit(first_index + len(units), path, file, start, end, weight, 1))
            start, weight = g + 1, 0
    return units


def read_units(cfg: SourceConfig, window_bytes: int = WINDOW_BYTES) -> list[ReadUnit]:
    """Every read unit of the source, in document order. `window_bytes`: the window grid (tests use a
    small one; it decides the shard layout, so the stage always uses the default)."""
    if cfg.kind == "hf_dataset":
        from pipelines.data.sources import hf_dataset

        return [ReadUnit(i, str(i), i) for i in range(hf_dataset(cfg).num_shards)]
    units: list[ReadUnit] = []
    for file, path in enumerate(source_files(cfg)):
        units += cut_file(cfg, file, path, len(units), window_bytes)
    return units
