"""One shard end to end in pure Python: cleaning, split, instances, stats; odd input counted, never fatal."""
from pipelines.data.config import PreprocessConfig
from pipelines.data.documents import RawDocument, SkipCounter
from pipelines.data.shard import process_shard
from pipelines.data.sources import iter_documents, read_units
from pipelines.data.tokenizer import train_wordpiece

ENGLISH = [f"Topic {i} is described here. It has several sentences about {i}. The third says more about it."
           for i in range(40)]
ODD = ["日本語の文章です。これは二つ目の文です。", "مرحبا بالعالم. هذه جملة ثانية.", "Zero\u200bwidth and \u202eRTL\u202c text. 🙂🙃 emoji.",
       "Control \x00 chars \x07 here. Second one."]


def _cfg(**kw):
    return PreprocessConfig.model_validate({"source": {"kind": "text", "path": __file__}, "max_seq_length": 64,
                                            "validation_fraction": 0.2, "min_document_tokens": 4, **kw})


def test_shard_statistics_and_counted_skips(tmp_path):
    tok = train_wordpiece(ENGLISH + ODD, 400, True, str(tmp_path), 64)
    docs = [RawDocument(str(i), "", t, "plain") for i, t in enumerate(ENGLISH + ODD)]
    docs += [RawDocument("empty", "", "   \n\n ", "plain"), RawDocument("short", "", "Hi.", "plain"),
             RawDocument("surrogate", "", "bad \udcff text", "plain"),
             RawDocument("dab", "D", "'''D''' may mean:\n* x\n{{disambiguation}}", "wikitext")]
    tables, stats = process_shard(docs, "00000-000000", _cfg(masking="static"), 42, tok)
    assert stats.skipped == {"empty": 1, "too_short": 1, "undecodable": 1, "disambiguation": 1}
    assert sum(stats.documents.values()) == len(ENGLISH) + len(ODD)
    assert stats.documents["validation"] > 0 and stats.documents["train"] > stats.documents["validation"]
    assert tables["train"].num_rows == stats.instances["train"] > 0
    assert stats.masked_tokens > 0 and 0.1 < stats.masked_tokens / stats.maskable_tokens < 0.2
    again, _ = process_shard(docs, "00000-000000", _cfg(masking="static"), 42, tok)
    assert again["train"].equals(tables["train"])  # seeded by shard id: the same wherever it runs
    other, _ = process_shard(docs, "00000-000001", _cfg(masking="static"), 42, tok)
    assert not other["train"].equals(tables["train"])


# BERT's pretraining input: one sentence per line, a blank line between documents. "It rained. We stayed in."
# is one line, so one sentence; a line the segmenter would re-cut or merge must stay as its author split it.
BERT_DOCUMENTS = [
    ["The old mill stood by the river for two hundred years.", "It rained. We stayed in.",
     "Farmers brought their grain to the mill every autumn."],
    ["A small harbour lies at the end of the valley road.", "Fishing boats leave before dawn each day.",
     "Mr. Brown has kept the lighthouse since he was young.", "Visitors often climb the cliff path at sunset."],
    ["Winter in the mountains is long and very cold.", "Snow closes the pass for several months.",
     "The village school stays open all the same."],
]


def _bert_file(tmp_path) -> str:
    # Blank, whitespace-only and repeated separator lines, CRLF endings and no final newline: all seen in dumps.
    blocks = ["\n".join(BERT_DOCUMENTS[0]), "\r\n".join(BERT_DOCUMENTS[1]), "\n".join(BERT_DOCUMENTS[2])]
    path = tmp_path / "bert.txt"
    path.write_bytes(("\n\n" + blocks[0] + "\n \n\n" + blocks[1] + "\r\n\r\n" + blocks[2]).encode())
    return str(path)


def _text_shard(tmp_path, **source):
    path = _bert_file(tmp_path)
    cfg = _cfg(source={"kind": "text", "path": path, **source}, validation_fraction=0.0)
    skipped = SkipCounter()
    docs = [d for u in read_units(cfg.source) for d in iter_documents(cfg.source, u, skipped)]
    tok = train_wordpiece(ENGLISH + [s for doc in BERT_DOCUMENTS for s in doc], 400, True, str(tmp_path / "tok"), 64)
    _, stats = process_shard(docs, "00000-000000", cfg, 42, tok)
    return docs, stats


def test_text_source_keeps_each_line_as_one_sentence(tmp_path):
    docs, stats = _text_shard(tmp_path)
    assert [d.markup for d in docs] == ["lines"] * 3
    assert stats.skipped == {} and stats.documents["train"] == 3
    assert stats.sentences == sum(map(len, BERT_DOCUMENTS))  # 10 lines, 10 sentences
    assert stats.instances["train"] > 0


def test_text_source_sentence_per_line_false_uses_the_segmenter(tmp_path):
    docs, stats = _text_shard(tmp_path, sentence_per_line=False)
    assert [d.markup for d in docs] == ["plain"] * 3
    assert stats.sentences == sum(map(len, BERT_DOCUMENTS)) + 1  # "It rained. We stayed in." is two sentences
