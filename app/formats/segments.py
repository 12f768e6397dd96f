"""A result's Markdown split back into the layout blocks it was built from, and grouped into units.

``full.md`` is the pages' Markdown joined in order, and each page's Markdown is its blocks' Markdown
joined by blank lines (``app.pipeline.assemble``). Every export starts here: ``read_document``
rebuilds ``full.md`` from ``result.json`` and finds, for every block, the span of ``full.md`` that
holds it, so a chunk's text is an exact slice of ``full.md`` and its boxes are the boxes of the
blocks in that slice. ``units`` then groups those spans the way a reader does: a heading, a figure
with its caption, a table with its caption and footnotes, an equation, a run of text.

The page Markdown, not the blocks, is the truth: a block is found in it by its text (a heading's
whitespace may have been collapsed), text no block claims still becomes a span, so nothing of
``full.md`` is ever lost.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.result_files import IMAGE_NAME

IMAGE_LINK_PREFIX = "images/"  # how full.md links a crop (app.pipeline.assemble.IMAGE_DIR)
_HEADING_TYPES = {"title": 1, "sub_title": 2}
_SURROGATE = re.compile("[\ud800-\udfff]")
# An ATX heading line; a closing run of #s counts only after a space (CommonMark), so "# C#" is "C#".
_HEADING_LINE = re.compile(r"^(#{1,6})[ \t]+(?P<text>[^\n]*?)(?:[ \t]+#+)?[ \t]*$")

UnitKind = Literal["heading", "figure", "table", "equation", "text"]
Role = Literal["text", "link"]  # a block's Markdown, or an image block's link to its crop
_Span = tuple[int, int, int | None, Role]  # start, end, block (None: claimed by no block), role


class StoredBlock(BaseModel):
    """A block of a ``result.json`` page (the same list as ``layout.json``), the fields read here."""

    model_config = ConfigDict(extra="ignore")

    type: str = "text"
    bbox: list[int] | None = None  # page pixels
    bbox_norm: list[int] | None = None  # the model's 0-999 scale
    bbox_pt: list[float] | None = None  # PDF points; absent in results written before it existed
    boxes: list[list[int]] | None = None  # every box, where the block has several
    boxes_norm: list[list[int]] | None = None
    boxes_pt: list[list[float]] | None = None
    text: str | None = None
    image: str | None = None  # "images/pNNNN_NN.png"


class StoredPage(BaseModel):
    """A page of ``result.json``, the fields read here."""

    model_config = ConfigDict(extra="ignore")

    index: int  # position in the result
    page: int  # 1-based page number in the document
    width: int = 0  # pixels of the rendered page
    height: int = 0
    dpi: float | None = None
    markdown: str = ""
    blocks: list[StoredBlock] = Field(default_factory=list)


@dataclass(frozen=True)
class Segment:
    """One span of ``full.md``: one block's Markdown, one figure link, or text no block claims."""

    start: int  # character offsets in full.md; full_md[start:end] is the span, never blank
    end: int
    page: StoredPage
    block: int | None  # position in page.blocks; None for text no block claims
    role: Role

    @property
    def type(self) -> str:
        """The block's type, ``"text"`` for unclaimed text."""
        return "text" if self.block is None else self.page.blocks[self.block].type

    @property
    def image_name(self) -> str | None:
        """The crop's file name when this is a figure link."""
        if self.role != "link" or self.block is None:
            return None
        image = self.page.blocks[self.block].image or ""
        return image.removeprefix(IMAGE_LINK_PREFIX)


@dataclass(frozen=True)
class Document:
    """``full.md`` rebuilt from ``result.json``, and its segments in reading order."""

    markdown: str  # exactly full.md
    pages: list[StoredPage]  # by index
    segments: list[Segment]

    def text(self, segment: Segment) -> str:
        return self.markdown[segment.start : segment.end]


@dataclass
class Unit:
    """Segments a reader keeps together, in order (see ``units``)."""

    kind: UnitKind
    segments: list[Segment]
    level: int = 0  # heading level, 1 for a title; 0 for other kinds
    # For a figure: the link segments (one per crop) and the segments that caption it.
    links: list[Segment] = field(default_factory=list)
    captions: list[Segment] = field(default_factory=list)

    @property
    def start(self) -> int:
        return self.segments[0].start

    @property
    def end(self) -> int:
        return self.segments[-1].end


def read_document(result: Mapping[str, Any]) -> Document:
    """Rebuild ``full.md`` from a parsed ``result.json`` and split it into segments.

    ``full.md`` is the pages' Markdown by ``index``, each stripped, empty pages skipped, joined by a
    blank line and ending in one newline (``app.pipeline.assemble.merge_markdown``). Raises
    ``pydantic.ValidationError`` when ``result["pages"]`` is not a list of pages.
    """
    raw_pages: Sequence[Any] = result.get("pages") or []
    pages = sorted(
        (_clean(StoredPage.model_validate(page)) for page in raw_pages), key=lambda page: page.index
    )
    parts: list[str] = []
    segments: list[Segment] = []
    offset = 0
    for page in pages:
        text = page.markdown.strip()
        if not text:
            continue
        if parts:
            offset += 2  # the blank line between pages
        lead = len(page.markdown) - len(page.markdown.lstrip())
        spans = _page_spans(page, page.markdown)
        segments.extend(
            Segment(offset + start - lead, offset + end - lead, page, block, role)
            for start, end, block, role in spans
        )
        parts.append(text)
        offset += len(text)
    return Document(markdown="\n\n".join(parts) + "\n", pages=pages, segments=segments)


def _clean(page: StoredPage) -> StoredPage:
    """The page with any lone surrogate (JSON can escape one; no encoding can write it) replaced by
    U+FFFD, in its Markdown and its blocks alike, so they still match and every export encodes."""
    page.markdown = _SURROGATE.sub("\ufffd", page.markdown)
    for block in page.blocks:
        if block.text:
            block.text = _SURROGATE.sub("\ufffd", block.text)
    return page


def units(document: Document) -> list[Unit]:
    """Group the document's segments into headings, figures, tables, equations and text.

    A ``title`` or ``sub_title`` block (or any text that is one Markdown heading line) is a heading.
    An image block's links and its own text form one figure; an ``image_caption`` right after a
    figure (or, failing that, right before one) joins it as its caption. A ``table_caption`` right
    before a table (or, failing that, right after one) and the ``table_footnote``s right after it
    join the table. ``equation`` blocks are units of their own; everything else is text, a unit per
    segment. Units are in reading order and together hold every segment once.
    """
    items = document.segments
    result: list[Unit] = []
    for i, segment in enumerate(items):
        kind = segment.type
        previous = result[-1] if result else None
        following = items[i + 1].type if i + 1 < len(items) else None
        if kind == "image":
            if previous is None or not _takes_image(previous, segment):
                previous = Unit("figure", [])
                result.append(previous)
            previous.segments.append(segment)
            (previous.links if segment.role == "link" else previous.captions).append(segment)
        elif kind == "image_caption" and previous is not None and previous.kind == "figure":
            previous.segments.append(segment)
            previous.captions.append(segment)
        elif kind == "image_caption" and following == "image":
            result.append(Unit("figure", [segment], captions=[segment]))
        elif kind == "table_caption" and following == "table":
            result.append(Unit("table", [segment]))
        elif previous is not None and _joins_table(previous, kind):
            previous.segments.append(segment)
        elif kind == "table":
            result.append(Unit("table", [segment]))
        elif kind == "equation":
            result.append(Unit("equation", [segment]))
        elif (level := _heading_level(segment, document.text(segment))) is not None:
            result.append(Unit("heading", [segment], level=level))
        else:
            result.append(Unit("text", [segment]))
    return result


def _takes_image(unit: Unit, segment: Segment) -> bool:
    """Whether an image segment belongs to ``unit``: its caption came first, or it is the same block."""
    if unit.kind != "figure":
        return False
    images = [s for s in unit.segments if s.type == "image"]
    if not images:
        return True
    last = images[-1]
    return last.page is segment.page and last.block == segment.block and unit.segments[-1] is last


def _joins_table(unit: Unit, kind: str) -> bool:
    """Whether a segment of ``kind`` joins the table ``unit`` before it: the table its caption
    announced, or a caption or footnote after the table."""
    if unit.kind != "table":
        return False
    if kind == "table":
        return all(s.type == "table_caption" for s in unit.segments)
    return kind in ("table_caption", "table_footnote")


def heading_text(markdown: str) -> str:
    """A heading's text without its ``#`` marker and with its whitespace collapsed."""
    match = _HEADING_LINE.match(markdown.strip())
    text = match.group("text") if match else markdown
    return " ".join(text.split())


def _heading_level(segment: Segment, text: str) -> int | None:
    """The heading level of a segment: its Markdown marker's, else its block type's; None if not one."""
    match = _HEADING_LINE.match(text) if "\n" not in text else None
    if match:
        return len(match.group(1))
    return _HEADING_TYPES.get(segment.type)


def _page_spans(page: StoredPage, markdown: str) -> list[_Span]:
    """Every block's span in the page's Markdown, plus the text no block claims, in order."""
    claimed: list[_Span] = []
    cursor = 0
    for index, block in enumerate(page.blocks):
        pieces: list[tuple[Role, re.Pattern[str] | str]] = []
        name = (block.image or "").removeprefix(IMAGE_LINK_PREFIX)
        if block.type == "image" and IMAGE_NAME.match(name):
            pieces.append(("link", f"![]({IMAGE_LINK_PREFIX}{name})"))
        if block.text and block.text.strip():
            pieces.append(("text", _text_pattern(block)))
        for role, pattern in pieces:
            span = _find(markdown, pattern, cursor, claimed)
            if span is not None:
                claimed.append((span[0], span[1], index, role))
                cursor = max(cursor, span[1])
    claimed.sort()
    spans: list[_Span] = []
    position = 0
    for start, end, owner, role in claimed:
        spans.extend(_unclaimed(markdown, position, start))
        spans.append((start, end, owner, role))
        position = end
    spans.extend(_unclaimed(markdown, position, len(markdown)))
    return spans


def _text_pattern(block: StoredBlock) -> re.Pattern[str] | str:
    """What a block's text looks like in the page Markdown.

    Verbatim, except that a title or sub-title gained a ``#`` marker and had its whitespace
    collapsed onto one line (``app.pipeline.assemble.block_markdown``).
    """
    text = (block.text or "").strip()
    if block.type not in _HEADING_TYPES:
        return text
    words = r"\s+".join(re.escape(word) for word in text.split())
    return re.compile(rf"(?:#{{1,6}}[ \t]+)?{words}")


def _find(
    markdown: str,
    pattern: re.Pattern[str] | str,
    cursor: int,
    claimed: Sequence[tuple[int, int, int | None, str]],
) -> tuple[int, int] | None:
    """The first occurrence at or after ``cursor``, else the first earlier one not already claimed.

    Usually blocks come in the Markdown's order; an image block's text follows all of its links,
    so a link can come before the text found ahead of it.
    """
    for start_at, stop_at in ((cursor, len(markdown)), (0, cursor)):
        position = start_at
        while True:
            if isinstance(pattern, str):
                start = markdown.find(pattern, position)
                span = None if start < 0 else (start, start + len(pattern))
            else:
                match = pattern.search(markdown, position)
                span = None if match is None else match.span()
            if span is None or span[0] >= stop_at:
                break
            if not any(span[0] < end and start < span[1] for start, end, _, _ in claimed):
                return span
            position = span[0] + 1
    return None


def _unclaimed(markdown: str, start: int, end: int) -> list[tuple[int, int, None, Literal["text"]]]:
    """The non-blank text between two claimed spans, split at blank lines, trimmed."""
    spans: list[tuple[int, int, None, Literal["text"]]] = []
    for match in re.finditer(r"\S(?:.*?\S)?(?=\s*\n\s*\n|\s*\Z)", markdown[start:end], re.DOTALL):
        spans.append((start + match.start(), start + match.end(), None, "text"))
    return spans
