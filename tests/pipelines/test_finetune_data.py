"""Loading a task's splits: local files, the gensim polarity sentences, the hub branch, and the checks that
stop a bad dataset before training."""
from __future__ import annotations

import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.data.paths import resolve_source_path
from pipelines.finetune.config import TaskData
from pipelines.finetune.data import hub_args, load_task_splits
from pipelines.finetune.tasks import POLARITY_PATH, get_task

SST = [{"sentence": f"review number {i} .", "label": i % 2, "idx": i} for i in range(10)]


def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_jsonl_files_keep_only_the_task_columns_and_subset_deterministically(tmp_path):
    files = {"train": _jsonl(tmp_path / "train.jsonl", SST), "validation": _jsonl(tmp_path / "dev.jsonl", SST[:4])}
    data = TaskData(files=files, max_train_examples=6)
    splits, stats = load_task_splits(get_task("sst2"), data)
    assert sorted(splits) == ["train", "validation"]
    assert splits["train"].column_names == ["sentence", "label"]
    assert stats["train_available"] == 10 and stats["train_subset_dropped"] == 4 and stats["train_examples"] == 6
    assert stats["validation_examples"] == 4 and stats["validation_subset_dropped"] == 0
    again, _ = load_task_splits(get_task("sst2"), data)
    assert list(again["train"]["sentence"]) == list(splits["train"]["sentence"])
    other, _ = load_task_splits(get_task("sst2"), TaskData(files=files, max_train_examples=6, split_seed=1))
    assert list(other["train"]["sentence"]) != list(splits["train"]["sentence"])


def test_csv_and_parquet_files(tmp_path):
    rows = [{"question": "what is it ?", "sentence": "it is a test .", "label": i % 2} for i in range(5)]
    csv = tmp_path / "dev.csv"
    csv.write_text("question,sentence,label\n" + "".join(f"{r['question']},{r['sentence']},{r['label']}\n"
                                                         for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    splits, stats = load_task_splits(get_task("qnli"), TaskData(files={"train": str(tmp_path / "train.parquet"),
                                                                       "validation": str(csv)}))
    assert stats["train_examples"] == stats["validation_examples"] == 5
    assert list(splits["validation"]["label"]) == [0, 1, 0, 1, 0]


def test_gensim_polarity_sentences_split_160_40_the_same_every_time():
    task = get_task("polarity")
    splits, stats = load_task_splits(task, TaskData())
    train, dev = splits["train"], splits["validation"]
    assert (len(train), len(dev)) == (160, 40)
    assert stats["malformed_skipped"] == 0 and stats["train_examples"] == 160
    assert sorted(set(train["label"])) == sorted(set(dev["label"])) == [0, 1]
    assert sum(dev["label"]) == 20  # stratified: the file is 100 negative, 100 positive
    assert not set(train["sentence"]) & set(dev["sentence"])
    assert "simplistic , silly and tedious ." in list(train["sentence"]) + list(dev["sentence"])
    assert any("clichés" in s for s in list(train["sentence"]) + list(dev["sentence"]))  # Windows-1252 decoded
    again, _ = load_task_splits(task, TaskData())
    assert list(again["validation"]["sentence"]) == list(dev["sentence"])
    reseeded, _ = load_task_splits(task, TaskData(split_seed=7))
    assert list(reseeded["validation"]["sentence"]) != list(dev["sentence"])


def test_malformed_polarity_lines_are_counted_not_silently_dropped(tmp_path):
    lines = open(resolve_source_path(POLARITY_PATH), "rb").read().splitlines()
    bad = tmp_path / "polarity.cor"
    bad.write_bytes(b"\n".join(lines[:20] + [b"no label here", b"__label__maybe so-so film ."] + lines[-20:]))
    splits, stats = load_task_splits(get_task("polarity"), TaskData(path=str(bad), holdout_fraction=0.25))
    assert stats["malformed_skipped"] == 2
    assert len(splits["train"]) + len(splits["validation"]) == 40 and len(splits["validation"]) == 10


def test_missing_column_names_task_split_column_and_columns_found(tmp_path):
    rows = [{"premise": "a b", "label": 0}]
    files = {s: _jsonl(tmp_path / f"{s}.jsonl", rows)
             for s in ("train", "validation_matched", "validation_mismatched")}
    with pytest.raises(ValueError, match=r"mnli: split 'train' lacks column\(s\) \['hypothesis'\]; "
                                         r"columns found: \['premise', 'label'\]"):
        load_task_splits(get_task("mnli"), TaskData(files=files))
    del files["validation_mismatched"]
    with pytest.raises(ValueError, match=r"missing \['validation_mismatched'\]"):
        load_task_splits(get_task("mnli"), TaskData(files=files))


def test_label_out_of_range_names_split_value_and_count(tmp_path):
    dev = SST[:3] + [{"sentence": "too good", "label": 2}, {"sentence": "way too good", "label": 2}]
    files = {"train": _jsonl(tmp_path / "t.jsonl", SST), "validation": _jsonl(tmp_path / "v.jsonl", dev)}
    with pytest.raises(ValueError, match=r"sst2: split 'validation': label 2 is outside \[0, 2\) in 2 row\(s\)"):
        load_task_splits(get_task("sst2"), TaskData(files=files))
    text = [{"sentence": "x", "label": "positive"}]
    files["validation"] = _jsonl(tmp_path / "s.jsonl", text)
    with pytest.raises(ValueError, match="must be ints.*'positive'"):
        load_task_splits(get_task("sst2"), TaskData(files=files))


def _qa(i: int, answer: str, start: int | None = None, context: str = "the cat sat on the mat .") -> dict:
    texts = [answer] if answer else []
    starts = [context.find(answer) if start is None else start] if answer else []
    return {"id": str(i), "title": "t", "question": "who sat ?", "context": context,
            "answers": {"text": texts, "answer_start": starts}}


def test_squad_answers_checked_unanswerable_and_misaligned_skipped(tmp_path):
    train = [_qa(0, "cat"), _qa(1, ""), _qa(2, "cat", start=9), _qa(3, "mat")]
    dev = [_qa(4, "cat"), _qa(5, "cat", start=9)]  # eval keeps misaligned starts: only texts are scored
    files = {"train": _jsonl(tmp_path / "t.jsonl", train), "validation": _jsonl(tmp_path / "v.jsonl", dev)}
    splits, stats = load_task_splits(get_task("squad"), TaskData(files=files))
    assert list(splits["train"]["id"]) == ["0", "3"] and list(splits["validation"]["id"]) == ["4", "5"]
    assert stats["train_unanswerable_skipped"] == 1 and stats["train_misaligned_skipped"] == 1
    assert splits["train"].column_names == ["id", "question", "context", "answers"]
    broken = dict(_qa(6, "cat"), answers={"text": ["cat", "the cat"], "answer_start": [4]})
    files["validation"] = _jsonl(tmp_path / "b.jsonl", dev + [broken])
    with pytest.raises(ValueError, match="squad: split 'validation' row 2: 'answers' must be"):
        load_task_splits(get_task("squad"), TaskData(files=files))


def test_hub_branch_and_hub_names(monkeypatch):
    calls = []
    dd = datasets.DatasetDict({s: datasets.Dataset.from_list(SST) for s in ("train", "validation", "test")})

    def fake_load(*args, **kwargs):
        calls.append(args)
        return dd

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    splits, stats = load_task_splits(get_task("sst2"), TaskData())
    assert calls == [("glue", "sst2")] and sorted(splits) == ["train", "validation"]
    load_task_splits(get_task("sst2"), TaskData(dataset="glue/sst2"))
    assert calls[-1] == ("glue", "sst2")
    with pytest.raises(ValueError, match=r"lacks split\(s\) \['validation_matched', 'validation_mismatched'\]"):
        load_task_splits(get_task("mnli"), TaskData())
    assert hub_args("glue/mnli") == ("glue", "mnli")
    assert hub_args("rajpurkar/squad") == ("rajpurkar/squad",)
    assert hub_args("nyu-mll/glue:qqp") == ("nyu-mll/glue", "qqp")


def test_local_saved_dataset_dict(tmp_path):
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(SST),
                               "validation": datasets.Dataset.from_list(SST[:2])})
    dd.save_to_disk(str(tmp_path / "sst"))
    splits, stats = load_task_splits(get_task("sst2"), TaskData(dataset=str(tmp_path / "sst")))
    assert stats["train_examples"] == 10 and list(splits["validation"]["label"]) == [0, 1]
