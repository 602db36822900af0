"""One shard end to end in pure Python: cleaning, split, instances, stats; odd input counted, never fatal."""
from pipelines.data.config import PreprocessConfig
from pipelines.data.documents import RawDocument
from pipelines.data.shard import process_shard
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
