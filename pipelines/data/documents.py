"""The unit every source yields: one document, before cleaning."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class RawDocument:
    doc_id: str  # stable identity (page id, dataset id, file:line): decides the train/validation split
    title: str
    text: str
    # wikitext: MediaWiki markup; plain: prose for the segmenter; lines: one sentence per "\n"-separated line
    markup: Literal["wikitext", "plain", "lines"]


class SkipCounter(Counter):
    """reason -> number of documents skipped for it; merged across shards into the manifest."""

    def skip(self, reason: str, n: int = 1) -> None:
        self[reason] += n


class ReadPosition:
    """How far a reader is through its read unit, from 0 to 1: the raw (compressed) bytes read of a file,
    the rows of a Parquet file. For progress and ETAs only; never decides an output byte."""

    def __init__(self) -> None:
        self.fraction = 0.0


class SourceError(RuntimeError):
    """A source that cannot be read on: names the file and the position."""
