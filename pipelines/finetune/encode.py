"""Examples -> unpadded token features (Arrow tables), for sentence(-pair) classification and SQuAD-style QA.

Nothing is dropped: long classification inputs are truncated and counted; long QA contexts become several
overlapping windows (features), each pointing back at its example by `example_index`.
"""
from __future__ import annotations

from typing import Any, Iterator, Sequence, Union

import pyarrow as pa
from transformers import PreTrainedTokenizerBase

from pipelines.finetune.tasks import TaskSpec

Rows = Union[Any, Sequence[dict]]  # a datasets.Dataset, or a list of example dicts
_BATCH = 1000
_IDS = pa.list_(pa.int32())
_TYPES = pa.list_(pa.int8())


def _batches(ds: Rows, columns: Sequence[str]) -> Iterator[tuple[int, dict[str, list]]]:
    """(offset, {column: values}) slices of a Dataset or a list of dicts."""
    for lo in range(0, len(ds), _BATCH):
        part = ds[lo:lo + _BATCH]
        if isinstance(part, list):
            part = {c: [row[c] for row in part] for c in columns}
        yield lo, {c: list(part[c]) for c in columns}


def encode_classification(ds: Rows, task: TaskSpec, tokenizer: PreTrainedTokenizerBase,
                          max_seq_length: int) -> tuple[pa.Table, dict[str, int]]:
    """Columns input_ids, token_type_ids, label, example_index. Pairs are truncated longest-first."""
    if task.kind != "classification":
        raise ValueError(f"task {task.name}: encode_classification needs a classification task, not {task.kind!r}")
    cols = {"input_ids": [], "token_type_ids": [], "label": [], "example_index": []}
    truncated = 0
    for lo, batch in _batches(ds, [*task.text_columns, task.label_column]):
        texts = [batch[c] for c in task.text_columns]
        # Untruncated first, so truncation can be counted; only the long ones are encoded again.
        enc = tokenizer(*texts, truncation=False, return_token_type_ids=True, return_attention_mask=False,
                        verbose=False)
        ids, types = list(enc["input_ids"]), list(enc["token_type_ids"])
        long = [i for i, x in enumerate(ids) if len(x) > max_seq_length]
        if long:
            cut = tokenizer(*[[t[i] for i in long] for t in texts], truncation="longest_first",
                            max_length=max_seq_length, return_token_type_ids=True, return_attention_mask=False)
            for j, i in enumerate(long):
                ids[i], types[i] = cut["input_ids"][j], cut["token_type_ids"][j]
            truncated += len(long)
        cols["input_ids"] += ids
        cols["token_type_ids"] += types
        cols["label"] += [int(x) for x in batch[task.label_column]]
        cols["example_index"] += range(lo, lo + len(ids))
    table = pa.table({"input_ids": pa.array(cols["input_ids"], _IDS),
                      "token_type_ids": pa.array(cols["token_type_ids"], _TYPES),
                      "label": pa.array(cols["label"], pa.int64()),
                      "example_index": pa.array(cols["example_index"], pa.int64())})
    return table, {"examples": len(ds), "features": table.num_rows, "truncated": truncated}


def encode_qa(ds: Rows, tokenizer: PreTrainedTokenizerBase, max_seq_length: int, doc_stride: int,
              max_query_length: int, train: bool) -> tuple[pa.Table, dict[str, int]]:
    """Sliding windows over each context (consecutive windows share `doc_stride` tokens).

    Columns: input_ids, token_type_ids, example_index, offset_start / offset_end (character span of each
    context token in the context, -1 elsewhere) and, when `train`, start_positions / end_positions: the
    answer's token span, or 0/0 ([CLS]) in a window that does not hold the whole answer.
    """
    cols: dict[str, list] = {k: [] for k in ("input_ids", "token_type_ids", "example_index",
                                              "offset_start", "offset_end", "start_positions", "end_positions")}
    stats = {"examples": len(ds), "features": 0, "windowed_examples": 0, "truncated_questions": 0}
    if train:
        stats.update(answer_outside_window_features=0, answer_in_no_window_examples=0)
    columns = ["question", "context"] + (["answers"] if train else [])
    for lo, batch in _batches(ds, columns):
        questions, n_cut = _truncate_questions(tokenizer, batch["question"], max_query_length)
        stats["truncated_questions"] += n_cut
        enc = tokenizer(questions, batch["context"], truncation="only_second", max_length=max_seq_length,
                        stride=doc_stride, return_overflowing_tokens=True, return_offsets_mapping=True,
                        return_token_type_ids=True, return_attention_mask=False)
        sample = enc["overflow_to_sample_mapping"]
        windows = [0] * len(questions)
        found = [False] * len(questions)
        for f, ex in enumerate(sample):
            windows[ex] += 1
            seq_ids = enc.sequence_ids(f)
            starts = [o[0] if s == 1 else -1 for o, s in zip(enc["offset_mapping"][f], seq_ids)]
            ends = [o[1] if s == 1 else -1 for o, s in zip(enc["offset_mapping"][f], seq_ids)]
            cols["input_ids"].append(enc["input_ids"][f])
            cols["token_type_ids"].append(enc["token_type_ids"][f])
            cols["example_index"].append(lo + ex)
            cols["offset_start"].append(starts)
            cols["offset_end"].append(ends)
            if train:
                s, e = _answer_tokens(batch["answers"][ex], starts, ends)
                cols["start_positions"].append(s)
                cols["end_positions"].append(e)
                found[ex] |= s > 0
                stats["answer_outside_window_features"] += s == 0
        stats["features"] += len(sample)
        stats["windowed_examples"] += sum(w > 1 for w in windows)
        if train:
            stats["answer_in_no_window_examples"] += found.count(False)
    data = {"input_ids": pa.array(cols["input_ids"], _IDS),
            "token_type_ids": pa.array(cols["token_type_ids"], _TYPES),
            "example_index": pa.array(cols["example_index"], pa.int64()),
            "offset_start": pa.array(cols["offset_start"], _IDS),
            "offset_end": pa.array(cols["offset_end"], _IDS)}
    if train:
        data["start_positions"] = pa.array(cols["start_positions"], pa.int64())
        data["end_positions"] = pa.array(cols["end_positions"], pa.int64())
    return pa.table(data), stats


def _truncate_questions(tokenizer: PreTrainedTokenizerBase, questions: list[str],
                        max_query_length: int) -> tuple[list[str], int]:
    """Cut each question after its `max_query_length`-th token (at that token's end, in characters),
    as the BERT reference does; leading spaces go (some SQuAD questions have many, wasting the window)."""
    questions = [q.lstrip() for q in questions]
    enc = tokenizer(questions, add_special_tokens=False, return_offsets_mapping=True,
                    return_attention_mask=False, return_token_type_ids=False, verbose=False)
    out, cut = [], 0
    for q, offsets in zip(questions, enc["offset_mapping"]):
        if len(offsets) > max_query_length:
            q = q[:offsets[max_query_length - 1][1]]
            cut += 1
        out.append(q)
    return out, cut


def _answer_tokens(answers: dict, starts: list[int], ends: list[int]) -> tuple[int, int]:
    """Token span of the first gold answer inside this window, or (0, 0) when it is not wholly inside."""
    start_char = answers["answer_start"][0]
    end_char = start_char + len(answers["text"][0])
    ctx = [i for i, s in enumerate(starts) if s >= 0]
    if not ctx or starts[ctx[0]] > start_char or ends[ctx[-1]] < end_char:
        return 0, 0
    # First token ending after the answer starts; last token starting before it ends.
    s = next(i for i in ctx if ends[i] > start_char)
    e = next(i for i in reversed(ctx) if starts[i] < end_char)
    return (s, e) if s <= e else (0, 0)  # e.g. an all-whitespace answer covers no token
