"""A worker that makes no progress for `stall_timeout_s` is stopped, with its stacks on record.

A multi-day run must never hang silently (a stale build lock, a collective whose peer is gone, a
storage mount that stopped answering). Each training worker and preprocess processor runs one
`StallWatchdog`: the code calls `beat(where)` at every step and phase, and growth of the process's
log file counts as progress too. When neither happens for `timeout_s`, the watchdog
1. writes every thread's Python stack to `<folder>/stall-<name>-<pid>.txt` and a record `.json` beside it
   (what stalled, for how long, the last progress, the innermost frames of the thread that beat),
2. waits `exit_grace_s` so that peers stalled at the same moment write theirs too,
3. ends the process with exit code STALL_EXIT: Ray sees a dead worker and the ordinary retry policy
   (Ray Train's `max_failures`, pofa's retries from the newest checkpoint) takes over.

The watchdog is a Python thread, which needs the GIL; a hang in C code that holds it is caught by
`faulthandler.dump_traceback_later`, armed at `timeout_s + backstop_s` and re-armed on progress,
which dumps from a C thread and exits the process by itself.
"""
from __future__ import annotations

import faulthandler
import json
import os
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from typing import IO, Any, Optional

STALL_EXIT = 86
RECORD_PREFIX = "stall-"


@dataclass(frozen=True)
class StallRecord:
    """What one stalled process left in its log folder (read back by the driver's error)."""

    name: str  # e.g. "teacher worker-1"
    pid: int
    host: str
    timeout_s: float
    stalled_s: float
    last_progress: str  # the last beat: "step 33", "starting: deepspeed.initialize", ...
    where: list[str]  # innermost frames of the thread that beat, innermost last
    stacks: str  # the file with every thread's stack
    time: float

    def line(self) -> str:
        frame = self.where[-1] if self.where else "unknown"
        return (f"{self.name} (pid {self.pid} on {self.host}) made no progress for {self.stalled_s:.0f} s "
                f"(stall_timeout_s={self.timeout_s:g}; last progress: {self.last_progress}); it was at {frame}; "
                f"stacks: {self.stacks}")


class StallWatchdog:
    """Start with `start()`, call `beat(where)` on progress, `stop()` at the end (idempotent)."""

    def __init__(self, name: str, timeout_s: float, folder: str, log_path: Optional[str] = None,
                 exit_grace_s: float = 10.0, backstop_s: float = 60.0) -> None:
        if timeout_s <= 0:
            raise ValueError(f"stall_timeout_s={timeout_s}: must be > 0")
        self.name, self.timeout_s, self.folder, self.log_path = name, float(timeout_s), folder, log_path
        self.exit_grace_s, self.backstop_s = exit_grace_s, backstop_s
        self._last = time.monotonic()
        self._where = "starting"
        self._idle = False
        self._beater: Optional[int] = None  # the thread that beats: its frames say where the work stopped
        self._log_size = self._size()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._backstop: Optional[IO[str]] = None
        self.fired: Optional[StallRecord] = None
        # one set of files per process: a retried worker of the same name writes beside, not over, the first
        self._base = os.path.join(folder, f"{RECORD_PREFIX}{_slug(name)}-{os.getpid()}")

    # -- the worker's side -----------------------------------------------------------------------
    def beat(self, where: str) -> None:
        """Progress: cheap enough for every step (two assignments; the backstop is re-armed by the thread)."""
        self._last, self._where, self._beater = time.monotonic(), where, threading.get_ident()
        self._idle = False

    def idle(self) -> None:
        """Waiting for work is not a stall (a processor between shards): not watched until the next beat."""
        self._idle = True
        self._last = time.monotonic()

    def start(self) -> "StallWatchdog":
        os.makedirs(self.folder, exist_ok=True)
        self._beater = threading.get_ident()
        self._backstop = open(f"{self._base}.backstop.txt", "a")
        self._arm_backstop()
        self._thread = threading.Thread(target=self._watch, name=f"pofa-stall-watchdog[{self.name}]", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._backstop is not None:
            faulthandler.cancel_dump_traceback_later()
            path = self._backstop.name
            self._backstop.close()
            self._backstop = None
            if os.path.exists(path) and os.path.getsize(path) == 0:
                os.remove(path)

    def __enter__(self) -> "StallWatchdog":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the watchdog's thread ---------------------------------------------------------------------
    def _watch(self) -> None:
        poll = min(5.0, max(0.2, self.timeout_s / 20))
        armed_at = self._last
        while not self._stop.wait(poll):
            size = self._size()
            if self._idle or size != self._log_size:  # idle, or a log line: progress too
                self._log_size, self._last = size, time.monotonic()
            if self._last != armed_at:
                armed_at = self._last
                self._arm_backstop()
            stalled = time.monotonic() - self._last
            if stalled >= self.timeout_s:
                self._fire(stalled)
                return

    def _fire(self, stalled: float) -> None:
        stacks = f"{self._base}.txt"
        frames = sys._current_frames()
        where = _frames(frames.get(self._beater)) if self._beater in frames else []
        record = StallRecord(name=self.name, pid=os.getpid(), host=os.uname().nodename, timeout_s=self.timeout_s,
                             stalled_s=round(stalled, 1), last_progress=self._where, where=where, stacks=stacks,
                             time=time.time())
        self.fired = record
        try:
            with open(stacks, "w") as f:
                f.write(f"{record.line()}\n\n{_all_stacks(frames)}")
            with open(f"{self._base}.json.tmp", "w") as f:
                json.dump(asdict(record), f, indent=1)
            os.replace(f"{self._base}.json.tmp", f"{self._base}.json")
        except OSError as exc:  # the record is lost, the stop is not: a hang is worse
            print(f"pofa: stall watchdog: cannot write {stacks} ({exc}); stacks follow\n{_all_stacks(frames)}",
                  file=sys.stderr, flush=True)
        print(f"pofa: stalled: {record.line()}; stopping this process in {self.exit_grace_s:g} s so the attempt "
              "fails and is retried", file=sys.stderr, flush=True)
        self._stop.wait(self.exit_grace_s)  # peers stalled at the same moment write their stacks too
        if self._stop.is_set():
            return  # the work ended meanwhile: nothing left to stop
        faulthandler.cancel_dump_traceback_later()
        os._exit(STALL_EXIT)

    def _arm_backstop(self) -> None:
        if self._backstop is not None:
            faulthandler.dump_traceback_later(self.timeout_s + self.exit_grace_s + self.backstop_s, exit=True,
                                              file=self._backstop)

    def _size(self) -> int:
        try:
            return os.path.getsize(self.log_path) if self.log_path else 0
        except OSError:
            return 0


class StallError(RuntimeError):
    """A stage's attempts ended because workers stalled, and the retries got no further."""


def stall_folder(spec: Any) -> str:
    """Where a stage's stalled workers leave their stacks: the attempt's log folder, else the run's folder."""
    return getattr(spec, "log_dir", None) or spec.run.root


def read_records(folder: Optional[str], since: float = 0.0) -> list[StallRecord]:
    """The stall records written into `folder` at or after `since` (epoch seconds), oldest first."""
    if not folder or not os.path.isdir(folder):
        return []
    found = []
    for name in sorted(os.listdir(folder)):
        if not (name.startswith(RECORD_PREFIX) and name.endswith(".json")):
            continue
        try:
            with open(os.path.join(folder, name)) as f:
                record = StallRecord(**json.load(f))
        except (OSError, ValueError, TypeError):
            continue  # a record torn by the exit it announced: the stacks file still says it
        if record.time >= since:
            found.append(record)
    return sorted(found, key=lambda r: r.time)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)


def _frames(frame: object, depth: int = 4) -> list[str]:
    summary = traceback.extract_stack(frame)[-depth:]  # type: ignore[arg-type]
    return [f"{os.path.relpath(f.filename) if f.filename.startswith(os.getcwd()) else f.filename}:{f.lineno} "
            f"in {f.name}" + (f" ({f.line.strip()})" if f.line else "") for f in summary]


def _all_stacks(frames: dict[int, object]) -> str:
    names = {t.ident: t.name for t in threading.enumerate()}
    parts = []
    for ident, frame in frames.items():
        parts.append(f"Thread {names.get(ident, '?')} ({ident}), most recent call last:\n"
                     + "".join(traceback.format_stack(frame)))  # type: ignore[arg-type]
    return "\n".join(parts)
