"""MediaWiki XML dump -> plain-text articles (redirects and non-article namespaces are counted skips)."""
from __future__ import annotations

import html
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from typing import IO

from .records import Document, Skips

_COMMENT = re.compile(r"<!--.*?-->", re.S)
_REF = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.S | re.I)
_DROPPED_TAGS = re.compile(r"<(math|gallery|timeline|score|syntaxhighlight|source|code|pre|table)\b.*?</\1>", re.S | re.I)
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")  # innermost {{...}}; repeated to peel nesting
_TABLE = re.compile(r"\{\|[^{}]*?\|\}", re.S)  # innermost {| ... |}
_FILE_LINK = re.compile(r"\[\[(?:File|Image|Category|Media):[^\[\]]*(?:\[\[[^\[\]]*\]\][^\[\]]*)*\]\]", re.I)
_INTERWIKI = re.compile(r"\[\[[a-z\-]{2,12}:[^\[\]]*\]\]")
_LINK = re.compile(r"\[\[(?:[^\[\]|]*\|)?([^\[\]]*)\]\]")
_EXTERNAL = re.compile(r"\[(?:https?|ftp)://[^\s\]]+\s*([^\]]*)\]")
_TAG = re.compile(r"</?[a-zA-Z][^>]*>")
_EMPHASIS = re.compile(r"'{2,}")
_HEADING = re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.M)
_LIST_MARK = re.compile(r"^[*#:;]+\s*", re.M)
_SPACES = re.compile(r"[ \t]+")
_BLANKS = re.compile(r"\n{2,}")


def strip_markup(text: str) -> str:
    """Wikitext -> readable paragraphs. Good enough for pretraining text, not a full parser."""
    text = _DROPPED_TAGS.sub("", _REF.sub("", _COMMENT.sub("", text)))
    text = _peel(_TEMPLATE, text)
    text = _peel(_TABLE, text)
    text = _peel(_FILE_LINK, text)
    text = _INTERWIKI.sub("", text)
    text = _peel(_LINK, text, r"\1")
    text = _EXTERNAL.sub(r"\1", text)
    text = html.unescape(_TAG.sub("", text))  # after tag removal, so an escaped "&lt;b&gt;" stays text
    text = _EMPHASIS.sub("", text)
    text = _HEADING.sub(r"\1", text)
    text = _LIST_MARK.sub("", text)
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    text = "\n".join(line for line in lines if not line.startswith(("{|", "|", "!", "__")))
    return _BLANKS.sub("\n", text).strip()


def _peel(pattern: re.Pattern, text: str, repl: str = "") -> str:
    while True:
        text, n = pattern.subn(repl, text)
        if n == 0:
            return text


def wiki_articles(stream: IO[bytes], name: str, skips: Skips) -> Iterator[Document]:
    """Articles of a MediaWiki export (namespace 0, not redirects), markup stripped."""
    ns_tag = None
    for _, elem in ET.iterparse(stream, events=("end",)):
        tag = elem.tag.rsplit("}", 1)[-1]
        if tag != "page":
            continue
        ns_tag = ns_tag or elem.tag[: -len("page")]
        title = elem.findtext(f"{ns_tag}title") or "?"
        where = f"{name}[page {title!r}]"
        text = elem.findtext(f"{ns_tag}revision/{ns_tag}text") or ""
        if elem.findtext(f"{ns_tag}ns") != "0":
            skips.skip("wiki_non_article", where)
        elif elem.find(f"{ns_tag}redirect") is not None or text.lstrip().upper().startswith("#REDIRECT"):
            skips.skip("wiki_redirect", where)
        else:
            plain = strip_markup(text)
            if plain:
                yield Document(plain, where)
            else:
                skips.skip("empty", where, "nothing left after markup stripping")
        elem.clear()  # keep memory flat on full dumps
