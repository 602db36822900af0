"""`<run>/logs/`: everything the console does not show, one file per process, stage and attempt.

    logs/driver.log                          the driver outside any stage (start, tracking, summary)
    logs/<stage>/attempt-<n>/driver.log      the driver during the stage: Ray, Ray Data, DeepSpeed, ...
    logs/<stage>/attempt-<n>/worker-<r>.log  each training worker (fine-tuning: <task>-<run>/worker-<r>.log)

`n` counts the stage's attempts in this run directory (each `pofa run` that ran the stage is one).
A folder that cannot be written costs the logs, never the run: the console says so in one line.
"""
from __future__ import annotations

import os
import re
import traceback
from typing import Callable, Optional

from workers.log_files import OutputRedirect
from workers.run_layout import RunLayout

_ATTEMPT = re.compile(r"^attempt-(\d+)$")


def next_attempt(folder: str) -> int:
    if not os.path.isdir(folder):
        return 1
    numbers = [int(m.group(1)) for n in os.listdir(folder) if (m := _ATTEMPT.match(n))]
    return max(numbers, default=0) + 1


class RunLogs:
    """Points the driver's output at the right file; hands each stage its folder for the workers.
    `capture=False` (`--verbose`, library callers): output stays live and workers keep theirs with Ray."""

    def __init__(self, layout: RunLayout, capture: bool, warn: Callable[[str], None]) -> None:
        self.layout, self.capture, self.warn = layout, capture, warn
        self._redirect = OutputRedirect()
        self.driver_log: Optional[str] = None
        self.broken = False

    def start(self) -> None:
        if self.capture:
            self._point(os.path.join(self.layout.logs, "driver.log"))

    def stage(self, stage: str) -> Optional[str]:
        """This attempt's log folder for `stage` (None when not capturing or not writable)."""
        if not self.capture or self.broken:
            return None
        base = os.path.join(self.layout.logs, stage)
        folder = os.path.join(base, f"attempt-{next_attempt(base)}")
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as exc:
            self._broken(folder, exc)
            return None
        return folder if self._point(os.path.join(folder, "driver.log")) else None

    def end_stage(self) -> None:
        if self.capture and not self.broken:
            self._point(os.path.join(self.layout.logs, "driver.log"))

    def record_failure(self, exc: BaseException) -> Optional[str]:
        """The traceback into the current driver log; returns that log's path."""
        if self.driver_log is None:
            return None
        try:
            with open(self.driver_log, "a") as f:
                traceback.print_exception(exc, file=f)
        except OSError:
            return None
        return self.driver_log

    def close(self) -> None:
        self._redirect.restore()
        self.driver_log = None

    def _point(self, path: str) -> bool:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "a"):
                pass
        except OSError as exc:
            self._broken(path, exc)
            return False
        if not self._redirect.switch(path):
            self._broken(path, OSError("cannot open"))
            return False
        self.driver_log = path
        return True

    def _broken(self, path: str, exc: BaseException) -> None:
        self.broken = True
        self._redirect.restore()
        self.driver_log = None
        self.warn(f"pofa: logs: cannot write {path} ({getattr(exc, 'strerror', None) or exc}); "
                  "the run goes on with its output on the console")
