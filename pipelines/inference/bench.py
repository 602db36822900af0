"""Time an ONNX Runtime session: per batch size, one warm-up run, then runs for at least
`min_seconds` (and at least 3); the median time per batch gives latency and throughput."""
from __future__ import annotations

import statistics
import time
from typing import Any, Sequence

import numpy as np


def feeds(input_names: Sequence[str], batch: int, seq_len: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    parts = {"input_ids": rng.integers(0, max(vocab, 2), (batch, seq_len), dtype=np.int64),
             "attention_mask": np.ones((batch, seq_len), dtype=np.int64),
             "token_type_ids": np.zeros((batch, seq_len), dtype=np.int64)}
    return {n: parts[n] for n in input_names}


def time_session(sess: Any, input_names: Sequence[str], batch_sizes: Sequence[int], seq_len: int, vocab: int,
                 min_seconds: float, min_runs: int = 3) -> dict[int, dict[str, float]]:
    """batch size -> {ms (median per batch), ms_p90, runs, seq_per_s}."""
    out: dict[int, dict[str, float]] = {}
    for batch in batch_sizes:
        feed = feeds(input_names, batch, seq_len, vocab)
        sess.run(None, feed)  # warm-up: allocations, kernel choice
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < min_runs or time.perf_counter() - start < min_seconds:
            t = time.perf_counter()
            sess.run(None, feed)
            times.append(time.perf_counter() - t)
        ms = statistics.median(times) * 1000
        out[batch] = {"ms": round(ms, 4), "ms_p90": round(float(np.percentile(times, 90)) * 1000, 4),
                      "runs": len(times), "seq_per_s": round(batch * 1000 / ms, 2)}
    return out
