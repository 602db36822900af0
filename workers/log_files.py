"""One log file per process and stage attempt: stdout and stderr of the process, at the file-descriptor
level, so Ray, DeepSpeed, transformers, C++ libraries and warnings all land there.

Logging must never fail a run: a folder that cannot be written leaves the output where it was
and says so once on the original stderr.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator, Optional


class OutputRedirect:
    """Points fds 1 and 2 of this process at a file until `restore()`; `switch()` moves to another."""

    def __init__(self) -> None:
        self._saved: Optional[tuple[int, int]] = None
        self.path: Optional[str] = None

    def switch(self, path: str) -> bool:
        """Send the output to `path` (appended). False, with a one-line note, when it cannot be opened."""
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as exc:
            _note(f"pofa: logs: cannot write {path} ({exc.strerror or exc}); this output stays where it was")
            return False
        _flush()
        if self._saved is None:
            self._saved = (os.dup(1), os.dup(2))
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        self.path = path
        return True

    def restore(self) -> None:
        if self._saved is None:
            return
        _flush()
        out, err = self._saved
        os.dup2(out, 1)
        os.dup2(err, 2)
        os.close(out)
        os.close(err)
        self._saved, self.path = None, None


@contextlib.contextmanager
def output_to(path: Optional[str]) -> Iterator[Optional[str]]:
    """This process's output goes to `path` inside the block (None: left alone). Yields the file in use."""
    if path is None:
        yield None
        return
    redirect = OutputRedirect()
    ok = redirect.switch(path)
    try:
        yield path if ok else None
    finally:
        redirect.restore()


def worker_log(log_dir: Optional[str], name: str) -> Optional[str]:
    """`<log_dir>/<name>.log`, or None when the stage gave no log folder (output stays with Ray)."""
    return os.path.join(log_dir, f"{name}.log") if log_dir else None


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass


def _note(line: str) -> None:
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
