"""The one line of an error a person reads first, for console lines and failure records."""
from __future__ import annotations

import re

_ERROR_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b")


def first_line(exc: BaseException, limit: int = 300) -> str:
    """Ray wraps a worker's error in a traceback whose last line is the error itself: that line when
    there is one, else the error's type and its first line."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    for ln in reversed(lines):
        if _ERROR_LINE.match(ln):
            return ln[:limit]
    return f"{type(exc).__name__}: {lines[0][:limit]}"
