"""Wikitext -> prose straight from mwparserfromhell's token stream, without its node tree.

mwparserfromhell's C tokenizer is fast; building the tree from its tokens (a Python node object per
template, parameter, tag and attribute, each setter re-entering `parse_anything` and its imports) was
~8x the tokenizer's CPU and ~75% of the preprocess stage's. This walker consumes the same tokens with the
builder's grammar (parser/builder.py, pinned 0.7.2) and emits exactly what `wikitext._render` emits from the
tree; dropped parts (templates, refs, tables, comments) are skipped without building anything.

Any token shape it does not mirror exactly (markup inside a tag's name, a construct left open, repeated
separators) raises `Unsupported`: the caller then takes the tree, which is the reference.
"""
from __future__ import annotations

from typing import Callable, Optional

from mwparserfromhell.nodes import HTMLEntity
from mwparserfromhell.parser import tokens as T
from mwparserfromhell.parser.builder import Builder

try:  # the C tokenizer the parser itself prefers; the pure-Python one emits the same tokens
    from mwparserfromhell.parser._tokenizer import CTokenizer as _Tokenizer
except ImportError:  # pragma: no cover - a build without the extension
    from mwparserfromhell.parser.tokenizer import Tokenizer as _Tokenizer

Out = Optional[list]  # None: consume without output (inside a dropped construct)


class Unsupported(Exception):
    """A token shape this walker does not reproduce; use the tree."""


def tokenize(wikitext: str) -> list:
    """The tokens `mwparserfromhell.parse(wikitext, skip_style_tags=True)` builds its tree from."""
    return _Tokenizer().tokenize(wikitext, 0, True)


class TokenRenderer:
    """One page's tokens -> (rendered pieces, names of its top-level templates)."""

    def __init__(self, tokens: list, drop_link: Callable[[str], object], drop_tags: frozenset[str]):
        self.toks = tokens
        self.n = len(tokens)
        self.i = 0
        self.depth = 0  # constructs open around the current token: 0 is the page's top level
        self.names: list[str] = []
        self.drop_link = drop_link
        self.drop_tags = drop_tags
        self.handlers = {T.TemplateOpen: self._template, T.ArgumentOpen: self._argument,
                         T.WikilinkOpen: self._wikilink, T.ExternalLinkOpen: self._external_link,
                         T.HTMLEntityStart: self._entity, T.HeadingStart: self._heading,
                         T.CommentStart: self._comment, T.TagOpenOpen: self._tag}

    def render(self) -> list[str]:
        out: list[str] = []
        if self._walk(out, ()) is not None:
            raise Unsupported("a closing token at the top level")
        return out

    def _walk(self, out: Out, stops: tuple) -> object:
        """Render tokens until one whose type is in `stops` (consumed and returned); None at the end."""
        toks, handlers, text = self.toks, self.handlers, T.Text
        while self.i < self.n:
            tok = toks[self.i]
            self.i += 1
            kind = type(tok)
            if kind is text:
                if out is not None:
                    out.append(tok["text"])
            elif kind in stops:
                return tok
            else:
                handler = handlers.get(kind)
                if handler is None:  # the builder raises ParserError here: the tree path reports it
                    raise Unsupported(kind.__name__)
                self.depth += 1
                handler(out)
                self.depth -= 1
        return None

    def _plain(self, stops: tuple) -> tuple[str, object]:
        """Text up to a stop token, for a tag's name; text only."""
        parts = []
        while self.i < self.n:
            tok = self.toks[self.i]
            self.i += 1
            if type(tok) is T.Text:
                parts.append(tok["text"])
            elif type(tok) in stops:
                return "".join(parts), tok
            else:
                raise Unsupported("markup inside a tag name")
        raise Unsupported("unclosed")

    def _string(self, out: Out, stops: tuple) -> tuple[str, object]:
        """The source string of a title or name up to a stop token (what `str()` of the tree's node gives),
        rendered into `out` on the way. Markup inside it (an entity, a comment, a nested template) is
        rare: only then are its few tokens built into a tree, by the builder itself, to get the string."""
        start = self.i
        tok = self._walk(out, stops)
        if tok is None:
            raise Unsupported("unclosed")
        part = self.toks[start:self.i - 1]
        if all(type(t) is T.Text for t in part):
            return "".join(t["text"] for t in part), tok
        return str(Builder().build(part)), tok

    def _until(self, out: Out, close: type, *more: type) -> None:
        """Walk to `close`, accepting the separators in `more` on the way."""
        stops = (close, *more)
        while True:
            tok = self._walk(out, stops)
            if tok is None:
                raise Unsupported("unclosed")
            if type(tok) is close:
                return

    def _template(self, out: Out) -> None:
        stops = (T.TemplateParamSeparator, T.TemplateParamEquals, T.TemplateClose)
        if self.depth == 1:  # a top-level template: its name decides disambiguation pages
            name, tok = self._string(None, stops)
            self.names.append(name)
        else:
            tok = self._walk(None, stops)
        if tok is None or type(tok) is T.TemplateParamEquals:
            raise Unsupported("template name")
        if type(tok) is not T.TemplateClose:
            self._until(None, T.TemplateClose, T.TemplateParamSeparator, T.TemplateParamEquals)

    def _argument(self, out: Out) -> None:
        self._until(None, T.ArgumentClose, T.ArgumentSeparator)

    def _wikilink(self, out: Out) -> None:
        stops = (T.WikilinkSeparator, T.WikilinkClose)
        if out is None:
            title, tok, shown = "", self._walk(None, stops), None
        else:
            shown = []  # the title as rendered, shown when the link has no text
            title, tok = self._string(shown, stops)
        keep = out is not None and not self.drop_link(title)
        if type(tok) is T.WikilinkSeparator:
            tok = self._walk(out if keep else None, stops)
            if type(tok) is not T.WikilinkClose:
                raise Unsupported("wikilink separators")
        elif tok is None:
            raise Unsupported("unclosed")
        elif keep:
            out.extend(shown)

    def _external_link(self, out: Out) -> None:
        stops = (T.ExternalLinkSeparator, T.ExternalLinkClose)
        tok = self._walk(None, stops)  # the URL never shows
        if type(tok) is T.ExternalLinkSeparator:
            tok = self._walk(out, stops)  # the title
        if type(tok) is not T.ExternalLinkClose:
            raise Unsupported("external link")

    def _entity(self, out: Out) -> None:
        # the builder's own sequence: [Numeric [Hex]] Text End
        try:
            tok = self.toks[self.i]
            if type(tok) is T.HTMLEntityNumeric:
                hex_tok = self.toks[self.i + 1]
                if type(hex_tok) is T.HTMLEntityHex:
                    node = HTMLEntity(self.toks[self.i + 2]["text"], named=False, hexadecimal=True,
                                      hex_char=hex_tok.get("char"))
                    self.i += 4
                else:
                    node = HTMLEntity(hex_tok["text"], named=False, hexadecimal=False)
                    self.i += 3
            else:
                node = HTMLEntity(tok["text"], named=True, hexadecimal=False)
                self.i += 2
        except (IndexError, KeyError) as exc:
            raise Unsupported("entity") from exc
        if type(self.toks[self.i - 1]) is not T.HTMLEntityEnd:
            raise Unsupported("entity")
        if out is not None:
            out.append(node.normalize())

    def _heading(self, out: Out) -> None:
        if out is not None:
            out.append("\n\n")  # a heading ends a paragraph; its title is not prose
        self._until(None, T.HeadingEnd)

    def _comment(self, out: Out) -> None:
        self._until(None, T.CommentEnd)

    def _tag(self, out: Out) -> None:
        opener = self.toks[self.i - 1]
        ends = (T.TagAttrStart, T.TagCloseOpen, T.TagCloseSelfclose)
        if out is None:
            name, tok = "", self._walk(None, ends)
        else:
            name, tok = self._plain(ends)
        while type(tok) is T.TagAttrStart:  # attributes never show
            tok = self._walk(None, (*ends, T.TagAttrEquals, T.TagAttrQuote))
            while type(tok) in (T.TagAttrEquals, T.TagAttrQuote):
                tok = self._walk(None, (*ends, T.TagAttrEquals, T.TagAttrQuote))
        if tok is None:
            raise Unsupported("unclosed")
        name = name.lower()
        shown = out is not None and name not in self.drop_tags and opener.get("wiki_markup") != "{|"
        body: Out = None
        if type(tok) is T.TagCloseOpen:
            body = [] if shown else None
            tok = self._walk(body, (T.TagOpenClose, T.TagCloseClose, *ends))
            if type(tok) is T.TagOpenClose:  # contents, then the closing tag's name
                tok = self._walk(None, (T.TagCloseClose, T.TagOpenClose, *ends))
            else:
                body = None  # closed without a closing tag: the builder files the nodes elsewhere
            if type(tok) is not T.TagCloseClose:
                raise Unsupported("tag")
        if shown:
            if name in ("li", "dd", "dt"):
                out.append("\n")  # list items are lines of their own
            if body:
                out.extend(body)
