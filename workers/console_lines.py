"""Lines for the person at the console, from code that must not know how the console is drawn.

`pofa run` installs its console here (orchestrator/console.py): a line then prints above the live
progress line, and is copied to the driver's log. Without one (a library caller, a test) the line is
printed as it is. Only the driver process says anything: workers' output goes to their log files.
"""
from __future__ import annotations

from typing import Callable, Optional

_sink: Optional[Callable[[str], None]] = None


def install(sink: Callable[[str], None]) -> Callable[[], None]:
    """Send `say` to `sink` until the returned undo is called."""
    global _sink
    previous, _sink = _sink, sink

    def undo() -> None:
        global _sink
        _sink = previous
    return undo


def say(line: str) -> None:
    if _sink is not None:
        _sink(line)
    else:
        print(line, flush=True)
