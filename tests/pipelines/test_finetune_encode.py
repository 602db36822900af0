"""Tokenizing fine-tuning examples: counted truncation for GLUE pairs, labelled sliding windows for SQuAD."""
from __future__ import annotations

import pyarrow as pa
import pytest
import torch
from transformers import BertTokenizerFast

from pipelines.data.tokenizer import build_wordpiece_vocab
from pipelines.finetune.collate import collate_features
from pipelines.finetune.encode import encode_classification, encode_qa
from pipelines.finetune.tasks import get_task

CONTEXT = ("the river flows north through the old valley . farmers grow wheat and barley near the banks . "
           "in spring the water rises and floods the low fields . the town of millford was founded in 1820 by "
           "settlers from the coast . a stone bridge crosses the river at the centre of town . "
           "every summer a fair is held on the meadow beside the bridge .")
ANSWER = "founded in 1820 by settlers"


def make_tokenizer(extra: list[str] = ()) -> BertTokenizerFast:
    """A WordPiece tokenizer learned from the test sentences: no hub, no unknown tokens on them."""
    texts = [CONTEXT, "when was millford founded ?", "what crosses the river ?", *extra] * 3
    vocab = build_wordpiece_vocab(texts, 400, lowercase=True)
    return BertTokenizerFast(vocab={p: i for i, p in enumerate(vocab)}, do_lower_case=True)


def _squad_row(question: str, answer: str = ANSWER, context: str = CONTEXT) -> dict:
    return {"id": question, "question": question, "context": context,
            "answers": {"text": [answer], "answer_start": [context.index(answer)]}}


def test_classification_pairs_truncated_longest_first_and_counted():
    tok = make_tokenizer()
    task = get_task("mnli")
    rows = [{"premise": "the river flows north .", "hypothesis": "the river flows .", "label": 0},
            {"premise": CONTEXT, "hypothesis": "the town was founded in 1820 .", "label": 2},
            {"premise": "a fair is held .", "hypothesis": "farmers grow wheat .", "label": 1}]
    table, stats = encode_classification(rows, task, tok, max_seq_length=24)
    assert stats == {"examples": 3, "features": 3, "truncated": 1}
    assert table.schema.field("input_ids").type == pa.list_(pa.int32())
    assert table.schema.field("label").type == pa.int64()
    assert table.column("label").to_pylist() == [0, 2, 1]
    assert table.column("example_index").to_pylist() == [0, 1, 2]
    ids = table.column("input_ids").to_pylist()
    types = table.column("token_type_ids").to_pylist()
    assert len(ids[1]) == 24 and all(len(x) < 24 for x in (ids[0], ids[2]))  # unpadded
    assert ids[0] == tok("the river flows north .", "the river flows .")["input_ids"]
    # longest_first keeps the short hypothesis whole and cuts the long premise.
    hyp = tok("the town was founded in 1820 .", add_special_tokens=False)["input_ids"]
    assert ids[1][-len(hyp) - 1:-1] == hyp and sum(types[1]) == len(hyp) + 1
    assert ids[1][0] == tok.cls_token_id and ids[1].count(tok.sep_token_id) == 2


def test_single_sentence_task_from_a_dataset_like_slice():
    tok = make_tokenizer()
    rows = {"sentence": ["the river flows north .", CONTEXT], "label": [1, 0]}

    class Rows:  # what datasets.Dataset slicing returns: a dict of columns
        def __len__(self):
            return 2

        def __getitem__(self, s):
            return {k: v[s] for k, v in rows.items()}

    table, stats = encode_classification(Rows(), get_task("sst2"), tok, max_seq_length=16)
    assert stats["truncated"] == 1 and table.num_rows == 2
    assert set(table.column("token_type_ids").to_pylist()[1]) == {0}


def test_long_context_gives_overlapping_windows_labelled_with_the_answer():
    tok = make_tokenizer()
    rows = [_squad_row("when was millford founded ?"), _squad_row("what crosses the river ?", "a stone bridge",
                                                                    "a stone bridge crosses the river .")]
    table, stats = encode_qa(rows, tok, max_seq_length=32, doc_stride=8, max_query_length=16, train=True)
    feats = table.to_pylist()
    first = [f for f in feats if f["example_index"] == 0]
    assert len(first) > 2 and len(feats) == len(first) + 1
    assert stats["examples"] == 2 and stats["features"] == len(feats) and stats["windowed_examples"] == 1
    assert stats["truncated_questions"] == 0 and stats["answer_in_no_window_examples"] == 0
    a0 = CONTEXT.index(ANSWER)
    labelled = 0
    for f in first:
        ctx = [i for i, s in enumerate(f["offset_start"]) if s >= 0]
        assert all(f["token_type_ids"][i] == 1 for i in ctx) and len(f["input_ids"]) <= 32
        assert all(f["offset_start"][i] == -1 for i, t in enumerate(f["token_type_ids"]) if t == 0)
        inside = f["offset_start"][ctx[0]] <= a0 and f["offset_end"][ctx[-1]] >= a0 + len(ANSWER)
        s, e = f["start_positions"], f["end_positions"]
        if inside:
            labelled += 1
            assert CONTEXT[f["offset_start"][s]:f["offset_end"][e]] == ANSWER
            assert tok.decode(f["input_ids"][s:e + 1]) == ANSWER
        else:
            assert (s, e) == (0, 0)
    assert labelled >= 1 and stats["answer_outside_window_features"] == len(first) - labelled
    # Windows overlap by doc_stride tokens and together cover every context token.
    covered = {(s, e) for f in first for s, e in zip(f["offset_start"], f["offset_end"]) if s >= 0}
    assert covered == {tuple(o) for o in tok(CONTEXT, add_special_tokens=False,
                                              return_offsets_mapping=True)["offset_mapping"]}
    a, b = first[0], first[1]
    tail = [x for x, s in zip(a["input_ids"], a["offset_start"]) if s >= 0][-8:]
    head = [x for x, s in zip(b["input_ids"], b["offset_start"]) if s >= 0][:8]
    assert tail == head


def test_long_question_truncated_and_counted_eval_features_unlabelled():
    tok = make_tokenizer(["in spring the water rises and floods the low fields near the old valley ?"])
    q = "in spring the water rises and floods the low fields near the old valley ?"
    table, stats = encode_qa([_squad_row(q)], tok, max_seq_length=40, doc_stride=8, max_query_length=6, train=False)
    assert stats["truncated_questions"] == 1 and stats["windowed_examples"] == 1
    assert "start_positions" not in table.column_names
    f = table.to_pylist()[0]
    question = [x for x, t in zip(f["input_ids"][1:], f["token_type_ids"][1:]) if t == 0][:-1]  # drop [SEP]
    assert question == tok(q, add_special_tokens=False)["input_ids"][:6]


def test_collate_pads_to_the_longest_row_and_passes_targets():
    tok = make_tokenizer()
    rows = [{"sentence": "the river flows north .", "label": 1}, {"sentence": "a fair .", "label": 0}]
    table, _ = encode_classification(rows, get_task("sst2"), tok, max_seq_length=16)
    feats = table.to_pylist()
    batch = collate_features(feats, pad_token_id=tok.pad_token_id)
    n0, n1 = len(feats[0]["input_ids"]), len(feats[1]["input_ids"])
    assert set(batch) == {"input_ids", "token_type_ids", "attention_mask", "labels"}
    assert all(t.dtype == torch.long for t in batch.values())
    assert batch["input_ids"].shape == (2, n0) and n1 < n0
    assert batch["attention_mask"].sum(1).tolist() == [n0, n1]
    assert batch["input_ids"][1, n1:].eq(tok.pad_token_id).all() and batch["labels"].tolist() == [1, 0]
    qa, _ = encode_qa([_squad_row("when was millford founded ?")], tok, 32, 8, 16, train=True)
    qa_batch = collate_features(qa.to_pylist(), pad_token_id=tok.pad_token_id)
    assert qa_batch["start_positions"].tolist() == qa.column("start_positions").to_pylist()
    assert "labels" not in qa_batch and "offset_start" not in qa_batch
    with pytest.raises(ValueError, match="'label' is in 1 of 2 rows"):
        collate_features([feats[0], {k: v for k, v in feats[1].items() if k != "label"}], tok.pad_token_id)
