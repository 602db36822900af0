"""The token-stream cleaner gives exactly what the parse tree gives, on real pages and on hand-made markup
(every construct, nesting, and shapes it must leave to the tree)."""
from __future__ import annotations

import bz2

import pytest
from mwparserfromhell.parser import tokens as T

from pipelines.data.paths import resolve_source_path
from pipelines.data.wikitext import _DROP_LINK, _DROP_TAGS, clean_page, clean_wikitext, is_disambiguation, parse
from pipelines.data.wikitext_tokens import TokenRenderer, Unsupported, tokenize
from pipelines.data.xml_pages import Piece, iter_pages, page_fields

GENSIM = "pkg://gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"

CASES = [
    "plain prose. Two sentences.",
    "{{Infobox person|name=X|born={{birth date|1815|12|10}}}}'''Ada''' was an [[England|English]] [[poet]].",
    "Text<ref name=\"a\">Cite {{cite book|title=Y}} [[Link]]</ref> more.<ref name=b/> end",
    "== Life ==\nA para.\n=== Sub {{tpl}} ===\nB para.",
    "{| class=wikitable\n|-\n| cell || [[x]]\n|}\nafter",
    "* one\n* two [[a|b]]\n# three\n; term : definition\n: indented",
    "[[File:Ada.png|thumb|A [[portrait]] of her]] [[Category:X]] [[fr:Ada]] [[:Category:Y|shown]] [[ wp : Z ]]",
    "See [http://example.org the ''site''] and http://bare.example.org and [http://nolabel.org].",
    "&nbsp;&amp;&#169;&#x00A9;&eacute; x &bogus; y",
    "<!-- hidden -->visible<!-- also\nhidden -->",
    "{{{arg|default}}} text {{{1}}}",
    "<div class=\"x\">dropped</div><span style=\"a\">kept [[in|span]]</span><b>bold</b><sup>1</sup>",
    "<math>x^2</math> <code>c</code> <pre>p</pre> <gallery>\nFile:a.png|cap\n</gallery> ok",
    "x<br/>y<br>z <p>para</p>",
    "{{disambiguation}}\n'''M''' may mean:\n* a",
    "{{Set index article}} text",
    "{{ Geodis }}",
    "text {{Infobox|a=1}} {{dab}}",
    "<ref>{{dab}}</ref> nested dab is not top level",
    "[[{{tpl}}|text]] and [[a{{b}}c]] [[OS&nbsp;X]] [[fr&#58;x]] [[ <!-- c -->fr:y]] [[Category{{!}}:z]]",
    "{{a {{b}} c|x}} top-level name with markup {{formatnum:{{Inflation|US|1}}}}",
    "{{Infobox song <!-- comment -->|a=b}} {{set index <!-- c --> }} {{ {{x}} disambiguation}}",
    "{{disambiguation<!-- c -->}} text",
    "{{&#100;isambiguation}} text",
    "[[link|with|pipes]] [[unclosed",
    "{{unclosed template",
    "<ref>unclosed ref",
    "]] }} stray closers [[ {{",
    "'''''bold italic''''' and ''it''",
    "<table><tr><td>html table</td></tr></table> after",
    "<nowiki>[[not a link]]</nowiki> <poem>a\nb</poem>",
    "line\n----\nrule",
    "<li>html item</li><dd>dd</dd><dt>dt</dt>",
    "",
]


def _tree(text: str) -> tuple[bool, str]:
    code = parse(text)
    disambiguation = is_disambiguation(code)
    return disambiguation, "" if disambiguation else clean_wikitext(code)


def _walked(text: str) -> bool:
    """Whether the token walker itself handles the text (rather than leaving it to the tree)."""
    try:
        TokenRenderer(tokenize(text), _DROP_LINK.match, _DROP_TAGS).render()
        return True
    except Unsupported:
        return False


@pytest.mark.parametrize("text", CASES)
def test_same_as_the_tree_on_hand_made_markup(text):
    assert clean_page(text) == _tree(text)


def test_same_as_the_tree_on_every_page_of_the_gensim_fragment():
    xml = bz2.decompress(open(resolve_source_path(GENSIM), "rb").read())
    texts = [page_fields(page).get("text", "") for _, page in iter_pages(iter([Piece(0, True, xml, 0.0)]))]
    assert len(texts) > 200
    for text in texts:
        assert clean_page(text) == _tree(text)
    # the fast path is the one taken: a walker that left real pages to the tree would only cost time
    assert all(_walked(t) for t in texts)


def test_unsupported_shapes_fall_back_to_the_tree(monkeypatch):
    # shapes the tokenizer does not emit on real text: the builder would raise, so the walker refuses
    for tokens in ([T.Text(text="a"), T.TemplateClose()], [T.TemplateOpen(), T.Text(text="x")],
                   [T.TagOpenOpen(), T.TemplateOpen(), T.Text(text="b"), T.TemplateClose(), T.TagCloseSelfclose()]):
        with pytest.raises(Unsupported):
            TokenRenderer(tokens, _DROP_LINK.match, _DROP_TAGS).render()
    text = CASES[1] + "\n" + CASES[14]
    expected = _tree(text)

    def refuse(self):
        raise Unsupported("test")

    monkeypatch.setattr(TokenRenderer, "render", refuse)
    assert clean_page(text) == expected  # from the tree
