"""Atomic file writes shared by every stage: a half-written file never carries a final name."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _temp_beside(path: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=os.path.dirname(path))
    os.close(fd)
    return tmp


def write_parquet_atomic(table: pa.Table, path: str) -> str:
    """Write, fsync, rename; returns the content hash."""
    tmp = _temp_beside(path)
    try:
        pq.write_table(table, tmp, compression="zstd")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        digest = file_sha256(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return digest


def write_json_atomic(obj: Any, path: str) -> None:
    write_text_atomic(json.dumps(obj, indent=2, sort_keys=True), path)


def write_text_atomic(text: str, path: str) -> None:
    tmp = _temp_beside(path)
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextmanager
def atomic_dir(path: str) -> Iterator[str]:
    """Build a folder under a temporary name beside `path`; it replaces `path` only when the block
    ends without an error (a half-built folder is removed, never published). A reader always finds
    `path`, old or new: the two are swapped in one step where the kernel can, else the old one is
    moved aside first and a crash between the two renames is undone on the next call."""
    path = path.rstrip("/")
    tmp, old = path + ".tmp", path + ".old"
    if not os.path.exists(path) and os.path.isdir(old):
        os.rename(old, path)  # a crash between the two renames below: the committed folder is `old`
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not os.path.isdir(path) or os.path.islink(path):
        if os.path.lexists(path):
            os.unlink(path)
        os.replace(tmp, path)
    elif exchange_paths(tmp, path):
        shutil.rmtree(tmp, ignore_errors=True)  # now the old folder
    else:
        os.rename(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def exchange_paths(a: str, b: str) -> bool:
    """Swap two existing paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the
    kernel, C library or file system cannot, so the caller falls back to two renames."""
    import ctypes
    import errno

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    rc = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), f"{a} <-> {b}")
