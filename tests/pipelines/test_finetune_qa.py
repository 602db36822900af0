"""SQuAD post-processing (windows -> answer text) and its EM/F1, on hand-made examples."""
from __future__ import annotations

import numpy as np
import pytest

from pipelines.finetune.encode import encode_qa
from pipelines.finetune.metrics import squad_metrics
from pipelines.finetune.qa import postprocess_qa
from tests.pipelines.test_finetune_encode import _squad_row, make_tokenizer


def _feature(example_index: int, offsets: list[tuple[int, int] | None]) -> dict:
    """None = a question or special token."""
    return {"example_index": example_index, "offset_start": [o[0] if o else -1 for o in offsets],
            "offset_end": [o[1] if o else -1 for o in offsets]}


def test_best_valid_span_ignores_question_tokens_reversed_spans_and_padding():
    ctx = "the cat sat on the mat"
    offs = [None, None, None, (0, 3), (4, 7), (8, 11), (12, 14), (15, 18), (19, 22), None]  # [CLS] q [SEP] ctx [SEP]
    ex = [{"id": "a", "context": ctx}]
    start = np.full((1, 12), -100.0)
    end = np.full((1, 12), -100.0)
    start[0, 1] = end[0, 1] = 500  # a question token: never an answer
    start[0, 11] = end[0, 11] = 900  # padding past the feature's 10 tokens
    start[0, 8], end[0, 3] = 40, 40  # start after end: invalid
    start[0, 4], end[0, 7] = 20, 10  # "cat sat on the"
    assert postprocess_qa(ex, [_feature(0, offs)], start, end) == {"a": "cat sat on the"}
    # Longer than max_answer_length tokens: the best short span wins instead.
    end[0, 5] = 5
    assert postprocess_qa(ex, [_feature(0, offs)], start, end, max_answer_length=3) == {"a": "cat sat"}


def test_example_without_a_valid_span_gets_empty_answer():
    ex = [{"id": "a", "context": "x y"}, {"id": "b", "context": "x y"}]
    feats = [_feature(0, [None, (0, 1), (2, 3), None])]  # example b has no feature at all
    start = np.array([[9.0, 0, 0, 0]])
    out = postprocess_qa(ex, feats, start, start.copy(), n_best_size=1)
    assert out == {"a": "", "b": ""}  # n_best=1 keeps only [CLS], not a context token


def test_answer_across_a_window_boundary_is_taken_from_the_window_that_holds_it():
    tok = make_tokenizer()
    answer = "the water rises and floods the low fields"  # crosses the end of the first window
    row = _squad_row("when was millford founded ?", answer)
    table, _ = encode_qa([row], tok, max_seq_length=32, doc_stride=8, max_query_length=16, train=True)
    feats = table.to_pylist()
    a0 = row["answers"]["answer_start"][0]
    a1 = a0 + len(answer)
    # A window where the answer starts but runs past its last context token.
    cut = next(i for i, f in enumerate(feats)
               if a0 in f["offset_start"] and max(f["offset_end"]) < a1)
    full = next(i for i, f in enumerate(feats) if f["start_positions"] > 0)
    assert feats[cut]["start_positions"] == 0 and cut != full
    width = max(len(f["input_ids"]) for f in feats)
    start, end = np.zeros((len(feats), width)), np.zeros((len(feats), width))
    last_ctx = max(i for i, s in enumerate(feats[cut]["offset_start"]) if s >= 0)
    start[cut, feats[cut]["offset_start"].index(a0)], end[cut, last_ctx] = 6, 6  # partial answer, 12
    start[full, feats[full]["start_positions"]], end[full, feats[full]["end_positions"]] = 7, 7  # full, 14
    assert postprocess_qa([row], table, start, end) == {row["id"]: answer}
    start[cut, feats[cut]["offset_start"].index(a0)] = 9  # now the partial span scores higher
    assert postprocess_qa([row], table, start, end)[row["id"]] == "the water rises and"


def test_oracle_logits_from_training_labels_give_exact_match_100():
    tok = make_tokenizer()
    rows = [_squad_row("when was millford founded ?"),
            _squad_row("what crosses the river ?", "a stone bridge"),
            _squad_row("what crosses the river ?", "the river", "a stone bridge crosses the river .")]
    rows[2]["id"] = "short"
    table, _ = encode_qa(rows, tok, max_seq_length=32, doc_stride=8, max_query_length=16, train=True)
    n, width = table.num_rows, max(len(x) for x in table.column("input_ids").to_pylist())
    start, end = np.zeros((n, width)), np.zeros((n, width))
    for f, (s, e) in enumerate(zip(table.column("start_positions").to_pylist(),
                                   table.column("end_positions").to_pylist())):
        start[f, s] += 10
        end[f, e] += 10
    preds = postprocess_qa(rows, table, start, end)
    assert preds == {r["id"]: r["answers"]["text"][0] for r in rows}
    assert squad_metrics(preds, rows) == {"exact_match": 100.0, "f1": 100.0}


def _gold(i: int, *texts: str) -> dict:
    return {"id": str(i), "answers": {"text": list(texts), "answer_start": [0] * len(texts)}}


def test_squad_metric_normalizes_and_takes_the_best_gold_answer():
    examples = [_gold(0, "cat"), _gold(1, "broncos", "Denver Broncos"), _gold(2, "red dog house"), _gold(3, "x")]
    preds = {"0": "The cat", "1": "Denver Broncos!", "2": "big red dog", "3": ""}
    out = squad_metrics(preds, examples)
    assert out["exact_match"] == pytest.approx(50.0)
    # F1: 1 (articles dropped), 1 (punctuation, best gold), 2/3 (2 of 3 tokens each way), 0.
    assert out["f1"] == pytest.approx(100 * (1 + 1 + 2 / 3 + 0) / 4)
    assert squad_metrics({"0": "a cat sat"}, [_gold(0, "cat")])["f1"] == pytest.approx(100 * 2 / 3)


def test_squad_metric_rejects_a_missing_prediction():
    with pytest.raises(ValueError, match="'1'"):
        squad_metrics({"0": "cat"}, [_gold(0, "cat"), _gold(1, "dog")])
