"""Wikitext -> plain prose with a real parser (mwparserfromhell).

Templates, tables, references, comments, files/categories/interwiki links and headings are dropped;
links and formatting render as their visible text. One linear walk over the parse tree (node removal
in mwparserfromhell searches the tree each time, which is quadratic on long articles); `clean_page` walks
the parser's token stream instead (pipelines/data/wikitext_tokens.py) and needs the tree only for the
token shapes that walker leaves to it.
"""
from __future__ import annotations

import re

import mwparserfromhell
from mwparserfromhell.nodes import (Argument, Comment, ExternalLink, Heading, HTMLEntity, Tag, Template, Text,
                                    Wikilink)
from mwparserfromhell.wikicode import Wikicode

from pipelines.data.wikitext_tokens import TokenRenderer, tokenize

# Tags whose content is never prose.
_DROP_TAGS = frozenset({"ref", "references", "table", "gallery", "math", "chem", "score", "timeline", "syntaxhighlight",
              "source", "pre", "code", "imagemap", "graph", "mapframe", "hiero", "templatedata", "noinclude",
              "includeonly", "div", "sup", "sub", "br"})
# Link namespaces that render no prose (files, categories) and interlanguage links like [[fr:...]].
_DROP_LINK = re.compile(r"^\s*:?\s*(file|image|media|category|wikipedia|wp|template|help|portal|special|"
                        r"[a-z]{2,3}(-[a-z]+)?)\s*:", re.IGNORECASE)
_DISAMBIG = re.compile(r"^\s*(disambiguation|disambig|dab|hndis|geodis|set index|.*[ _]disambiguation)\s*$",
                       re.IGNORECASE)
_WS = re.compile(r"[ \t\u00a0]+")
_EMPTY_PARENS = re.compile(r"\(\s*[,;]?\s*\)")
_SPACE_BEFORE_PUNCT = re.compile(r" +([,.;:])")
_QUOTE_MARKUP = re.compile(r"'{2,}")  # bold/italic markup left as text by skip_style_tags


def parse(wikitext: str) -> Wikicode:
    return mwparserfromhell.parse(wikitext, skip_style_tags=True)


def clean_page(wikitext: str) -> tuple[bool, str]:
    """(is a disambiguation page, its visible prose): what `is_disambiguation(parse(t))` and
    `clean_wikitext(parse(t))` give, from the token stream when it can (no node tree: a fraction of the
    CPU), else from the tree. Raises what `parse` raises on text the parser cannot take."""
    try:
        walker = TokenRenderer(tokenize(wikitext), _DROP_LINK.match, _DROP_TAGS)
        pieces = walker.render()
    except Exception:  # noqa: BLE001 - Unsupported, or the parser's own error: the tree decides
        code = parse(wikitext)
        disambiguation = is_disambiguation(code)
        return disambiguation, "" if disambiguation else clean_wikitext(code)
    if any(_DISAMBIG.match(name) for name in walker.names):
        return True, ""
    return False, _finish(pieces)


def is_disambiguation(code: Wikicode) -> bool:
    """True when the page carries a disambiguation template at top level."""
    return any(isinstance(n, Template) and _DISAMBIG.match(str(n.name)) for n in code.nodes)


def clean_wikitext(code: Wikicode | str) -> str:
    """Visible prose of a page: paragraphs separated by a blank line, lines within a paragraph joined."""
    if isinstance(code, str):
        code = parse(code)
    out: list[str] = []
    _render(code, out)
    return _finish(out)


def _finish(pieces: list[str]) -> str:
    return _normalise(_QUOTE_MARKUP.sub("", "".join(pieces)))


def _render(code: Wikicode, out: list[str]) -> None:
    for node in code.nodes:
        if isinstance(node, Text):
            out.append(node.value)
        elif isinstance(node, (Template, Comment, Heading, Argument)):
            if isinstance(node, Heading):
                out.append("\n\n")  # a heading ends a paragraph
        elif isinstance(node, Wikilink):
            if not _DROP_LINK.match(str(node.title)):
                _render(node.text if node.text is not None else node.title, out)
        elif isinstance(node, ExternalLink):
            if node.title is not None:
                _render(node.title, out)
        elif isinstance(node, Tag):
            tag = str(node.tag).lower()
            if tag in _DROP_TAGS or node.wiki_markup == "{|":
                continue
            if tag == "li" or tag == "dd" or tag == "dt":
                out.append("\n")  # list items are lines of their own
            if node.contents is not None:
                _render(node.contents, out)
        elif isinstance(node, HTMLEntity):
            out.append(node.normalize())


def _normalise(text: str) -> str:
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        lines = [ln.strip() for ln in block.splitlines()]
        # Leftovers of tables and bare markup lines are not prose.
        lines = [ln for ln in lines if ln and not ln.startswith(("{|", "|", "!", "=", "__"))]
        joined = _WS.sub(" ", " ".join(lines))
        joined = _SPACE_BEFORE_PUNCT.sub(r"\1", _EMPTY_PARENS.sub("", joined)).strip()
        if joined:
            paragraphs.append(joined)
    return "\n\n".join(paragraphs)
