"""What `pofa run` prints: per stage one header, one live line, one result; then the run's summary.

On a terminal the live line redraws in place; otherwise (a log file, CI) it is printed at most once
per tenth of the stage. Every other output of the run's processes goes to `<run>/logs/`
(orchestrator/run_logs.py); lines for people from deeper code arrive through
`workers.console_lines.say`.
"""
from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, TextIO

from workers.console_lines import install

REDRAW_S = 0.25  # a terminal's live line is redrawn at most this often


# (stage, done, total, metrics, ETA in s) -> the live line's text
Render = Callable[[str, int, int, Mapping[str, float], Optional[float]], str]


@dataclass
class _Live:
    total: int
    began: float
    render: Render
    first_step: Optional[int] = None
    shown_tenth: int = -1
    text: str = ""
    drawn: float = field(default=0.0)
    last: dict[str, float] = field(default_factory=dict)  # sparsity is logged on pruning steps only: kept


class Console:
    """The console of one `pofa run`: `console(line)` prints a line that stays; `progress()` feeds a
    stage's live line. Thread-safe: the tracking relay's thread feeds progress while stages print."""

    def __init__(self, out: TextIO, tty: Optional[bool] = None, verbose: bool = False,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.out = out
        self.tty = out.isatty() if tty is None else tty
        self.verbose = verbose
        self.capturing = False  # the process's own stdout goes to a log file: copy lines there too
        self._clock = clock
        self._lock = threading.RLock()
        self._live: dict[str, _Live] = {}
        self._drawn = ""  # the live line now on the terminal

    # -- lines that stay -----------------------------------------------------------------------
    def __call__(self, line: str) -> None:
        with self._lock:
            self._clear()
            self._write(line + "\n")
            self._redraw()
        if self.capturing:  # the driver's log keeps the story too, between the output it holds
            print(line, flush=True)

    # -- a stage's live line ------------------------------------------------------------------
    def begin(self, stage: str, total: int, render: Optional[Render] = None) -> None:
        """`stage` reports progress towards `total` (steps, unless `render` says otherwise) from now on."""
        with self._lock:
            self._live[stage] = _Live(total=max(int(total), 1), began=self._clock(), render=render or progress_line)

    def report(self, stage: str, done: int, total: int, metrics: Mapping[str, float],
               render: Optional[Render] = None) -> None:
        """Progress of a stage that learns its total as it goes (the preprocess stage's source bytes)."""
        with self._lock:
            live = self._live.get(stage)
            if live is None or live.total != max(int(total), 1):
                self.begin(stage, total, render)
            self.progress(stage, done, metrics)

    def progress(self, stage: str, step: int, metrics: Mapping[str, float]) -> None:
        with self._lock:
            live = self._live.get(stage)
            if live is None:
                return
            now = self._clock()
            if live.first_step is None:
                live.first_step, live.began = step, now
            live.last.update(metrics)
            live.text = live.render(stage, step, live.total, {**live.last, **metrics}, _eta(live, step, now))
            if self.tty:
                if now - live.drawn >= REDRAW_S or step >= live.total:
                    live.drawn = now
                    self._clear()
                    self._redraw()
                return
            tenth = step * 10 // live.total
            if tenth > live.shown_tenth and step < live.total:  # the result line says 100%
                live.shown_tenth = tenth
                self._write(live.text + "\n")

    def end(self, stage: str) -> None:
        with self._lock:
            self._clear()
            self._live.pop(stage, None)
            self._redraw()

    # -- drawing ------------------------------------------------------------------------------
    def _clear(self) -> None:
        if self.tty and self._drawn:
            self._write("\r\x1b[K")
            self._drawn = ""

    def _redraw(self) -> None:
        if not self.tty:
            return
        texts = [live.text for live in self._live.values() if live.text]
        if texts:
            self._drawn = " | ".join(texts)
            self._write(self._drawn)

    def _write(self, text: str) -> None:
        try:
            self.out.write(text)
            self.out.flush()
        except (OSError, ValueError):
            pass  # a closed terminal must not stop the run

    def attach(self) -> Callable[[], None]:
        """Route `workers.console_lines.say` here; returns the undo."""
        return install(self)


def as_console(console: Callable[[str], None]) -> Console:
    """A caller's plain callable (a test's list.append, print) as a Console with no live line."""
    if isinstance(console, Console):
        return console
    return _CallableConsole(console)


class _CallableConsole(Console):
    def __init__(self, fn: Callable[[str], None]) -> None:
        super().__init__(sys.stdout, tty=False, verbose=True)
        self.fn = fn

    def __call__(self, line: str) -> None:
        self.fn(line)

    def progress(self, stage: str, step: int, metrics: Mapping[str, float]) -> None:
        return None

    def report(self, stage: str, done: int, total: int, metrics: Mapping[str, float],
               render: Optional[Render] = None) -> None:
        return None


def progress_line(stage: str, step: int, total: int, metrics: Mapping[str, float], eta_s: Optional[float]) -> str:
    parts = [f"[{stage}] step {step}/{total} ({100 * step // max(total, 1)}%)"]
    if "loss" in metrics:
        parts.append(f"loss {metrics['loss']:.4f}")
        if "loss/kd" in metrics and "loss/hard" in metrics:  # distillation: the weighted sum of the two
            parts[-1] += f" (hard {metrics['loss/hard']:.3f}, KD {metrics['loss/kd']:.3f})"
    if "sparsity/global" in metrics and stage != "teacher":
        parts.append(f"sparsity {metrics['sparsity/global']:.3f}")
    rate = metrics.get("throughput/samples_per_s")
    return _with_rate_and_eta(parts, f"{rate:.0f} samples/s" if rate else None, eta_s)


def source_progress_line(stage: str, done: int, total: int, metrics: Mapping[str, float],
                         eta_s: Optional[float]) -> str:
    """The preprocess stage: how much of the source its finished shards cover, and their output so far."""
    if not metrics.get("by_bytes", 1.0):  # a hub dataset: its shards, not bytes
        parts = [f"[{stage}] {done}/{total} dataset shards read ({100 * done // max(total, 1)}%)"]
    else:
        parts = [f"[{stage}] {_size(done)}/{_size(total)} of source read ({100 * done // max(total, 1)}%)"]
    if "shards" in metrics:
        parts.append(f"{int(metrics['shards'])} shards")
    if "tokens" in metrics:
        parts.append(f"{_count(metrics['tokens'])} tokens")
    rate = metrics.get("throughput/tokens_per_s")
    return _with_rate_and_eta(parts, f"{_count(rate)} tokens/s" if rate else None, eta_s)


def _with_rate_and_eta(parts: list[str], rate: Optional[str], eta_s: Optional[float]) -> str:
    if rate:
        parts.append(rate)
    if eta_s is not None:
        parts.append(f"ETA {format_duration(eta_s)}")
    return "  ".join(parts)


def _scaled(n: float, units: tuple[str, str, str], sep: str = "") -> str:
    """1.2 GB, 3.4M: `units` name thousands^3, ^2 and ^1."""
    for unit, scale in zip(units, (1e9, 1e6, 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{sep}{unit}"
    return f"{int(n)}"


def _size(n: float) -> str:
    return _scaled(n, ("GB", "MB", "kB"), " ") if n >= 1e3 else f"{int(n)} B"


def _count(n: float) -> str:
    return _scaled(n, ("B", "M", "k"))


def _eta(live: _Live, step: int, now: float) -> Optional[float]:
    done = step - (live.first_step or 0)
    if done <= 0 or now <= live.began:
        return None
    return (live.total - step) * (now - live.began) / done


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    if seconds < 60:
        return f"{seconds}s"
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
