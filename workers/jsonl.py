"""JSON Lines files that pofa appends to (attempts, metrics): a torn last line never blocks a resume.

A process killed mid-write, or a full disk, can leave the last line half-written. Reading drops it
with a warning and truncates the file back to its last complete line, so the next append starts
on a clean line instead of gluing a record onto the fragment.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

logger = logging.getLogger("pofa")


def read_jsonl(path: str, repair: bool = True) -> list[dict[str, Any]]:
    """Every complete record of `path` ([] when it does not exist)."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    records: list[dict[str, Any]] = []
    good_end = 0
    offset = 0
    for raw in data.splitlines(keepends=True):
        offset += len(raw)
        text = raw.strip()
        if not text:
            good_end = offset
            continue
        try:
            record = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError):
            if offset == len(data):  # only the last line can be torn; anything else is real damage
                logger.warning("%s: dropped a torn last line (%d bytes)%s", path, len(raw),
                               "; file repaired" if repair else "")
                break
            raise ValueError(f"{path}: line is not JSON: {text[:80]!r}") from None
        if isinstance(record, dict):
            records.append(record)
        good_end = offset
    if repair and good_end < len(data):  # a torn last line: cut it off
        with open(path, "r+b") as f:
            f.truncate(good_end)
    elif repair and data and not data.endswith(b"\n"):  # complete, but the next append must start a line
        with open(path, "ab") as f:
            f.write(b"\n")
    return records
