"""Wall-clock timing with device synchronisation, warm-up and a time budget that truncates loops."""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch


def sync(device: torch.device) -> None:
    """Wait for the device's queued work: CUDA calls return before the kernels ran."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Budget:
    """A deadline for the whole benchmark: loops stop early rather than run past it."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.started = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def left(self) -> float:
        return self.seconds - self.elapsed()


class Skip(Exception):
    """A measurement that cannot run here; its message says why, in one line."""


@dataclass
class Timing:
    ms: list[float]  # one entry per timed call, after the warm-up
    truncated: bool  # the budget ran out before every planned call was timed

    @property
    def median_ms(self) -> float:
        return statistics.median(self.ms)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "median_ms": self.median_ms, "min_ms": min(self.ms), "n": len(self.ms)}


def time_calls(fn: Callable[[int], Any], device: torch.device, warmup: int, iters: int, budget: Budget,
               reserve_s: float = 0.0) -> Timing:
    """Call fn(i) warmup + iters times, timing each call after the warm-up between two synchronisations.
    Stops after the first timed call once less than `reserve_s` of the budget is left."""
    ms: list[float] = []
    for i in range(warmup + iters):
        sync(device)
        start = time.perf_counter()
        fn(i)
        sync(device)
        if i >= warmup:
            ms.append(1000 * (time.perf_counter() - start))
            if budget.left() < reserve_s and len(ms) < iters:
                return Timing(ms, truncated=True)
        elif budget.left() < reserve_s:
            raise Skip(f"time budget spent during the warm-up ({budget.elapsed():.0f} s elapsed)")
    return Timing(ms, truncated=False)


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak allocated device memory since the last reset (None off CUDA: no allocator statistics)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


@dataclass(frozen=True)
class Plan:
    """How much to measure: warm-up and timed calls per row, the shared budget, the device's peak."""

    budget: Budget
    warmup: int = 3
    iters: int = 10
    peak_tflops: float | None = None  # dense bf16, for MFU
