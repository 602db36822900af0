"""Source readers and wikitext cleaning on real and hand-made files, including damaged ones."""
import bz2
import json

import pytest

from pydantic import ValidationError

from pipelines.data.config import PreprocessConfig, SourceConfig
from pipelines.data.documents import ReadPosition, SkipCounter, SourceError
from pipelines.data.sentences import split_lines
from pipelines.data.shard import clean_document
from pipelines.data.sources import iter_documents, read_units, unit_size
from pipelines.data.wikitext import clean_wikitext, is_disambiguation, parse

PAGE = """<page><title>{title}</title><ns>{ns}</ns><id>{id}</id>{redirect}
<revision><id>9{id}</id><text xml:space="preserve">{text}</text></revision></page>"""


def _dump(tmp_path, pages, name="dump.xml.bz2"):
    xml = '<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">' + "".join(pages) + "</mediawiki>"
    path = tmp_path / name
    path.write_bytes(bz2.compress(xml.encode()))
    return str(path)


def _docs(cfg):
    skipped = SkipCounter()
    docs = [d for u in read_units(cfg) for d in iter_documents(cfg, u, skipped)]
    return docs, skipped


def test_wikitext_cleaning_removes_markup_and_keeps_prose():
    text = ("{{Infobox person|name=X}}'''Ada Lovelace''' was an [[England|English]] mathematician.<ref>Cite "
            "{{cite book|title=Y}}</ref> She wrote [[notes]].\n== Life ==\n{| class=wikitable\n|-\n| cell\n|}\n"
            "[[File:Ada.png|thumb|A portrait]] See [http://example.org the site].<!-- hidden -->\n"
            "[[Category:Mathematicians]] [[fr:Ada Lovelace]]")
    out = clean_wikitext(text)
    assert "Ada Lovelace was an English mathematician." in out
    assert "She wrote notes." in out
    assert "the site" in out
    for junk in ("Infobox", "cite", "cell", "portrait", "hidden", "Category", "fr:", "'''", "==", "{{", "[["):
        assert junk not in out
    assert "\n\n" in out  # the heading ended a paragraph


def test_disambiguation_recognised():
    assert is_disambiguation(parse("'''Mercury''' may refer to:\n* a planet\n{{disambiguation}}"))
    assert not is_disambiguation(parse("'''Mercury''' is a planet. {{Infobox planet}}"))


def test_xml_dump_skips_redirects_and_namespaces(tmp_path):
    pages = [PAGE.format(title="A", ns=0, id=1, redirect="", text="Alpha is a letter. It is first."),
             PAGE.format(title="B", ns=0, id=2, redirect='<redirect title="A" />', text="#REDIRECT [[A]]"),
             PAGE.format(title="Talk:A", ns=1, id=3, redirect="", text="chatter"),
             PAGE.format(title="C", ns=0, id=4, redirect="", text="#redirect [[A]]"),
             PAGE.format(title="D", ns=0, id=5, redirect="", text="{{dab}}\nD may mean many things.")]
    cfg = SourceConfig(kind="wikipedia_xml", path=_dump(tmp_path, pages))
    docs, skipped = _docs(cfg)
    assert [d.doc_id for d in docs] == ["1", "5"]
    assert skipped == {"redirect": 2, "non_article_namespace": 1}
    assert clean_document(docs[1], skipped) is None and skipped["disambiguation"] == 1


def test_truncated_dump_fails_naming_file_and_position(tmp_path):
    pages = [PAGE.format(title=f"P{i}", ns=0, id=i, redirect="", text="Some text here. " * 200) for i in range(50)]
    path = _dump(tmp_path, pages)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    cfg = SourceConfig(kind="wikipedia_xml", path=path)
    with pytest.raises(SourceError, match=r"dump\.xml\.bz2: corrupt or truncated dump near compressed byte \d+"):
        _docs(cfg)


def test_real_gensim_dump(wiki_dump):
    cfg = SourceConfig(kind="wikipedia_xml", path=wiki_dump)
    docs, skipped = _docs(cfg)
    assert len(docs) == 106 and skipped["redirect"] == 99
    assert docs[0].title == "Anarchism"
    cleaned = clean_document(docs[0], SkipCounter())
    assert cleaned.startswith("Anarchism is a political philosophy")


def test_jsonl_counts_malformed_and_undecodable_records(tmp_path):
    path = tmp_path / "docs.jsonl"
    lines = [json.dumps({"id": "a", "text": "Good text. More."}).encode(), b"{not json",
             json.dumps({"id": "b", "body": "wrong column"}).encode(), b'{"id": "c", "text": "\xff\xfe bad"}',
             json.dumps({"id": "d", "text": "Ünïcödé 日本語 текст. 🙂"}).encode(), b"", b"[1, 2]"]
    path.write_bytes(b"\n".join(lines))
    docs, skipped = _docs(SourceConfig(kind="jsonl", path=str(path)))
    assert [d.doc_id for d in docs] == ["a", "d"]
    assert skipped == {"malformed_record": 3, "undecodable": 1}


def test_text_blocks_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_text("First doc line one.\nline two.\n\n\nSecond doc.\n")
    docs, _ = _docs(SourceConfig(kind="text", path=str(tmp_path / "*.txt")))
    assert [d.text.strip() for d in docs] == ["First doc line one.\nline two.", "Second doc."]
    assert [d.markup for d in docs] == ["lines", "lines"]  # BERT format by default: each line one sentence
    pq.write_table(pa.table({"text": ["x y z", "p q"], "title": ["X", "P"]}), tmp_path / "d.parquet")
    docs, _ = _docs(SourceConfig(kind="parquet", path=str(tmp_path / "d.parquet"), id_column=None))
    assert [(d.doc_id, d.title) for d in docs] == [("d.parquet:1", "X"), ("d.parquet:2", "P")]


def test_sentence_per_line_defaults_and_is_text_only(tmp_path):
    (tmp_path / "a.txt").write_text("One line.\n")
    (tmp_path / "d.jsonl").write_text(json.dumps({"id": "a", "text": "Some text."}) + "\n")
    text, jsonl = str(tmp_path / "a.txt"), str(tmp_path / "d.jsonl")
    assert SourceConfig(kind="text", path=text).splits_lines
    assert not SourceConfig(kind="text", path=text, sentence_per_line=False).splits_lines
    assert not SourceConfig(kind="jsonl", path=jsonl).splits_lines
    assert not SourceConfig(kind="jsonl", path=jsonl, sentence_per_line=False).splits_lines  # says what it does
    with pytest.raises(ValidationError, match="sentence_per_line: only the text source"):
        PreprocessConfig.model_validate({"source": {"kind": "jsonl", "path": jsonl, "sentence_per_line": True}})


def test_lines_document_keeps_its_line_breaks_through_cleaning(tmp_path):
    text = "  First line.\x00\r\nIt rained. We stayed in.\r\nLast\u2028line.\n\t\nNext doc.\n"
    (tmp_path / "a.txt").write_bytes(text.encode())
    docs, skipped = _docs(SourceConfig(kind="text", path=str(tmp_path / "a.txt")))
    assert len(docs) == 2  # a whitespace-only line separates documents too
    cleaned = clean_document(docs[0], skipped)
    # Only "\n" ends a line, as in the reader: U+2028 stays inside its sentence.
    assert split_lines(cleaned) == ["First line.", "It rained. We stayed in.", "Last\u2028line."]


def _positions(cfg):
    """The reader's position as each document arrives, then after the last one."""
    (unit,) = read_units(cfg)
    position, seen = ReadPosition(), []
    for _ in iter_documents(cfg, unit, SkipCounter(), position):
        seen.append(position.fraction)
    return seen, position.fraction, unit_size(cfg, unit)


def test_the_read_position_follows_each_reader_to_the_end(wiki_dump, tmp_path):
    """Progress of the preprocess stage: how far through its file (compressed bytes) or rows a reader
    is; it only grows and is 1 once the unit is read."""
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq

    seen, end, size = _positions(SourceConfig(kind="wikipedia_xml", path=wiki_dump))
    assert size == os.path.getsize(wiki_dump) and len(seen) == 106
    assert seen == sorted(seen) and 0 < seen[0] < 0.5 < seen[-1] <= 1.0 and end == 1.0
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps({"id": str(i), "text": "word " * 2000}) + "\n" for i in range(200)))
    seen, end, _ = _positions(SourceConfig(kind="jsonl", path=str(jsonl)))
    assert seen == sorted(seen) and seen[0] < 0.2 and seen[99] < 0.8 and end == 1.0
    pq.write_table(pa.table({"text": [f"doc {i}" for i in range(10)]}), tmp_path / "d.parquet")
    seen, end, _ = _positions(SourceConfig(kind="parquet", path=str(tmp_path / "d.parquet"), id_column=None))
    assert seen == [i / 10 for i in range(1, 11)] and end == 1.0
    (tmp_path / "t.txt").write_text("".join(f"Block {i} line.\n\n" for i in range(3000)))
    seen, end, _ = _positions(SourceConfig(kind="text", path=str(tmp_path / "t.txt")))
    assert seen == sorted(seen) and seen[0] < 0.5 and end == 1.0
