"""Start/end logits of every window -> one answer string per question (the SQuAD v1.1 post-processing)."""
from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import pyarrow as pa

_COLUMNS = ("example_index", "offset_start", "offset_end")


def postprocess_qa(examples: Sequence[dict], features: Union[pa.Table, Sequence[dict]], start_logits: np.ndarray,
                   end_logits: np.ndarray, n_best_size: int = 20, max_answer_length: int = 30) -> dict[str, str]:
    """id -> best answer text over all of the example's windows ("" when no window has a valid span).

    A span is valid when start <= end, both are context tokens and it has at most `max_answer_length`
    tokens; candidates are the `n_best_size` best starts x ends of each window, scored start + end logit.
    Rows of the logits may be padded past their feature's length: those positions are ignored.
    """
    cols = _columns(features)
    n = len(cols["example_index"])
    start_logits, end_logits = np.asarray(start_logits), np.asarray(end_logits)
    if start_logits.shape[0] != n or end_logits.shape[0] != n:
        raise ValueError(f"postprocess_qa: {n} features but logits of shape {start_logits.shape} / "
                         f"{end_logits.shape}")
    best: dict[int, tuple[float, str]] = {}
    for f in range(n):
        ex = cols["example_index"][f]
        if not 0 <= ex < len(examples):
            raise ValueError(f"postprocess_qa: feature {f} has example_index {ex}, outside {len(examples)} examples")
        starts, ends = cols["offset_start"][f], cols["offset_end"][f]
        length = len(starts)
        if length > start_logits.shape[1]:
            raise ValueError(f"postprocess_qa: feature {f} has {length} tokens, logits only {start_logits.shape[1]}")
        s_log, e_log = start_logits[f, :length], end_logits[f, :length]
        span = _best_span(s_log, e_log, starts, ends, n_best_size, max_answer_length)
        if span is not None and (ex not in best or span[0] > best[ex][0]):
            context = examples[ex]["context"]
            best[ex] = (span[0], context[starts[span[1]]:ends[span[2]]])
    return {str(e["id"]): best[i][1] if i in best else "" for i, e in enumerate(examples)}


def _columns(features: Union[pa.Table, Sequence[dict]]) -> dict[str, list]:
    if isinstance(features, pa.Table):
        missing = [c for c in _COLUMNS if c not in features.column_names]
        if missing:
            raise ValueError(f"postprocess_qa: features lack column(s) {missing}")
        return {c: features.column(c).to_pylist() for c in _COLUMNS}
    return {c: [row[c] for row in features] for c in _COLUMNS}


def _best_span(s_log: np.ndarray, e_log: np.ndarray, starts: list[int], ends: list[int], n_best: int,
               max_len: int) -> tuple[float, int, int] | None:
    """(score, start token, end token) of the best valid span in one window, or None."""
    top_s = np.argsort(-s_log, kind="stable")[:n_best]
    top_e = np.argsort(-e_log, kind="stable")[:n_best]
    found = None
    for s in top_s:
        if starts[s] < 0:
            continue
        for e in top_e:
            if e < s or e - s + 1 > max_len or ends[e] < 0:
                continue
            score = float(s_log[s] + e_log[e])
            if found is None or score > found[0]:
                found = (score, int(s), int(e))
    return found
