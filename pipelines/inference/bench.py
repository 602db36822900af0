"""Time ONNX Runtime sessions: per batch size, one warm-up run each, then alternating rounds (a model
and the dense model it is compared with take turns, so a change of the machine's load during the
measurement falls on both alike); the median time per batch gives latency and throughput, and each
round's median is kept so that a ratio can be read round by round (its spread says how far to trust it)."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

ROUNDS = 5  # turns per session and batch size; each turn runs at least once


@dataclass(frozen=True)
class TimedSession:
    sess: Any  # an onnxruntime.InferenceSession
    input_names: Sequence[str]
    vocab: int


def feeds(input_names: Sequence[str], batch: int, seq_len: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    parts = {"input_ids": rng.integers(0, max(vocab, 2), (batch, seq_len), dtype=np.int64),
             "attention_mask": np.ones((batch, seq_len), dtype=np.int64),
             "token_type_ids": np.zeros((batch, seq_len), dtype=np.int64)}
    return {n: parts[n] for n in input_names}


def time_sessions(sessions: Sequence[TimedSession], batch_sizes: Sequence[int], seq_len: int, min_seconds: float,
                  min_runs: int = 3, rounds: int = ROUNDS) -> list[dict[int, dict[str, float]]]:
    """For each session: batch size -> {ms (median per batch), ms_p25, ms_p75, ms_p90, runs, seq_per_s,
    round_ms (each round's median)}. Each session is timed for about `min_seconds` per batch size in all, in
    `rounds` turns (at least `min_runs` runs)."""
    rounds = max(rounds, min_runs)
    out: list[dict[int, dict[str, float]]] = [{} for _ in sessions]
    for batch in batch_sizes:
        inputs = [feeds(s.input_names, batch, seq_len, s.vocab) for s in sessions]
        for s, feed in zip(sessions, inputs):
            s.sess.run(None, feed)  # warm-up: allocations, kernel choice
        times: list[list[float]] = [[] for _ in sessions]
        by_round: list[list[float]] = [[] for _ in sessions]
        for r in range(rounds):
            order = list(range(len(sessions)))
            for i in (order if r % 2 == 0 else order[::-1]):  # neither always first nor always last
                start, turn = time.perf_counter(), []
                while not turn or time.perf_counter() - start < min_seconds / rounds:
                    t = time.perf_counter()
                    sessions[i].sess.run(None, inputs[i])
                    turn.append(time.perf_counter() - t)
                times[i] += turn
                by_round[i].append(statistics.median(turn) * 1000)
        for i, ts in enumerate(times):
            ms = statistics.median(ts) * 1000
            p25, p75, p90 = (float(v) * 1000 for v in np.percentile(ts, [25, 75, 90]))
            out[i][batch] = {"ms": round(ms, 4), "ms_p25": round(p25, 4), "ms_p75": round(p75, 4),
                             "ms_p90": round(p90, 4), "runs": len(ts), "seq_per_s": round(batch * 1000 / ms, 2),
                             "round_ms": [round(v, 4) for v in by_round[i]]}
    return out
