"""A result split into chunks for retrieval, each citing the pages and boxes it came from.

The split follows the document's structure (``app.formats.segments``): a title or sub-title opens
a new chunk and sets the heading path of the chunks below it; a table (with its caption and
footnotes), an equation and a figure (with its caption) are never split, even when they alone pass
``max_tokens``; text is packed into a chunk while the chunk stays within ``max_tokens``, and a
paragraph is cut (at a sentence end, else a word, else anywhere) only when it alone does not fit.

Every chunk's ``text`` is a slice of ``full.md``: ``full_md[start:end]``. Without overlap the chunks
cover ``full.md`` in order and ``"\\n\\n".join(texts) + "\\n" == full_md`` wherever no paragraph was
cut (a cut paragraph's pieces are separated by the whitespace where it was cut). With ``overlap``,
a chunk that continues the text of the chunk before it, in the same section, starts with up to
``overlap`` tokens of that text (``overlap_chars`` characters, whole words); the overlap counts
toward ``max_tokens`` and cites no blocks (they belong to the chunk before).

The JSON document (``chunks.json``) is ``ChunkSet``; ``stream_chunks_json`` writes it chunk by
chunk.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, Field

from app.errors import InvalidOptions
from app.formats.segments import Document, Segment, Unit, heading_text, read_document, units
from app.formats.tokens import TokenCounter

DEFAULT_MAX_TOKENS = 512
DEFAULT_OVERLAP = 0
_SENTENCE_END = re.compile(r"(?:[.!?](?=\s)|[。！？])\s*|\n\s*")
# Characters; a cut or an overlap looks this far for a space before it keeps a token boundary
# instead (text without spaces, a long URL).
_LONGEST_WORD = 32
_SPACE = re.compile(r"\s+")


class ChunkBlock(BaseModel):
    """A layout block a chunk's text came from, with its boxes in three units."""

    page: int = Field(description="1-based page number in the document.")
    index: int = Field(description="The page's position in the result (pages[].index).")
    block: int = Field(description="The block's position in that page's blocks in layout.json.")
    type: str = Field(description="The model's label: title, text, table, equation, image...")
    bbox: list[int] | None = Field(description="[x0, y0, x1, y1] in pixels of the rendered page.")
    bbox_norm: list[int] | None = Field(description="The same box on the model's 0-999 scale.")
    bbox_pt: list[float] | None = Field(
        description="The same box in PDF points, origin at the page's top left (as PyMuPDF's "
        "page.rect); null for image documents."
    )
    boxes: list[list[int]] | None = Field(
        default=None, description="Each of the block's boxes in pixels, when it has several."
    )
    boxes_pt: list[list[float]] | None = Field(
        default=None, description="Each of the block's boxes in PDF points, when it has several."
    )


class ChunkFigure(BaseModel):
    """A figure in a chunk: its crop and its caption."""

    name: str = Field(description="The crop's file name, pNNNN_NN.png.")
    link: str = Field(description="Where to get the crop (images/<name> in full.md and the zip).")
    caption: str | None = Field(description="The figure's caption as Markdown, null when it has none.")
    page: int = Field(description="1-based page number in the document.")
    block: int = Field(description="The image block's position in that page's blocks.")


class Chunk(BaseModel):
    """One chunk: Markdown text, where it sits in the document, and what it cites."""

    index: int = Field(description="0-based position among the chunks.")
    text: str = Field(description="The chunk's Markdown, full_md[start:end], overlap included.")
    tokens: int = Field(description="Tokens in text, by the set's tokenizer, without special tokens.")
    headings: list[str] = Field(description="Titles above the chunk, outermost first.")
    pages: list[int] = Field(description="1-based page numbers the chunk's own text came from.")
    start: int = Field(description="Character offset of text in full.md.")
    end: int = Field(description="Character offset in full.md where text ends.")
    overlap_chars: int = Field(description="Leading characters of text that repeat the chunk before.")
    blocks: list[ChunkBlock] = Field(description="The layout blocks of the chunk's own text, in order.")
    figures: list[ChunkFigure] = Field(description="The figures in the chunk, in order.")


class ChunkSet(BaseModel):
    """``chunks.json``: how a result was split, and the chunks in reading order."""

    version: Literal[1] = 1
    tokenizer: str = Field(description='"chars" (a character estimate) or a Hugging Face repository id.')
    max_tokens: int = Field(
        description="The most tokens a chunk holds, unless one table, equation or figure is larger."
    )
    overlap: int = Field(description="The most tokens a chunk repeats of the one before it.")
    chunks: list[Chunk]


def check_limits(max_tokens: int, overlap: int) -> None:
    """Raise ``InvalidOptions`` unless ``1 <= max_tokens`` and ``0 <= overlap < max_tokens``."""
    if max_tokens < 1:
        raise InvalidOptions(f"max_tokens must be at least 1, not {max_tokens}")
    if not 0 <= overlap < max_tokens:
        raise InvalidOptions(
            f"overlap must be at least 0 and less than max_tokens ({max_tokens}), not {overlap}"
        )


def iter_chunks(
    result: Mapping[str, Any],
    counter: TokenCounter,
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    overlap: int = DEFAULT_OVERLAP,
    link_base: str = "images/",
) -> Iterator[Chunk]:
    """The chunks of a parsed ``result.json``, in reading order (see the module docstring).

    ``link_base`` prefixes a figure's crop name in ``ChunkFigure.link`` (a route can pass
    ``/v1/tasks/{id}/images/``). CPU work: run it in a thread. Raises ``InvalidOptions`` for bad
    limits (``check_limits``).
    """
    check_limits(max_tokens, overlap)
    document = read_document(result)
    builder = _Builder(document, counter, max_tokens, overlap, link_base)
    for unit in units(document):
        yield from builder.add(unit)
    yield from builder.flush()


def stream_chunks_json(
    result: Mapping[str, Any],
    counter: TokenCounter,
    *,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    overlap: int = DEFAULT_OVERLAP,
    link_base: str = "images/",
) -> Iterator[bytes]:
    """``chunks.json`` (a ``ChunkSet``) as UTF-8 pieces, one chunk at a time.

    The limits are checked before the first piece, so a bad request fails before any byte is sent.
    """
    check_limits(max_tokens, overlap)
    chunks = iter_chunks(result, counter, max_tokens=max_tokens, overlap=overlap, link_base=link_base)
    head = ChunkSet(tokenizer=counter.name, max_tokens=max_tokens, overlap=overlap, chunks=[])
    opening = head.model_dump_json()
    yield opening.removesuffix("[]}").encode() + b"["
    for i, chunk in enumerate(chunks):
        yield (b"," if i else b"") + chunk.model_dump_json().encode()
    yield b"]}"


@dataclass
class _Piece:
    """A part of the chunk being built: a span of full.md and the segments it cites."""

    start: int
    end: int
    segments: list[Segment]
    unit: Unit


@dataclass
class _Open:
    """The chunk being built."""

    start: int  # where its text starts in full.md, overlap included
    own_start: int  # where its own content starts
    pieces: list[_Piece] = field(default_factory=list)

    @property
    def end(self) -> int:
        return self.pieces[-1].end if self.pieces else self.own_start

    def has_content(self) -> bool:
        return any(piece.unit.kind != "heading" for piece in self.pieces)


class _Builder:
    def __init__(
        self, document: Document, counter: TokenCounter, max_tokens: int, overlap: int, link_base: str
    ) -> None:
        self._doc = document
        self._md = document.markdown
        self._counter = counter
        self._max = max_tokens
        self._overlap = overlap
        self._link_base = link_base
        self._headings: list[tuple[int, str]] = []  # (level, text), outermost first
        self._open: _Open | None = None
        # Tokens of the open chunk's text: counted exactly near the limit, else the sum of its
        # parts' counts (see _fits).
        self._tokens = 0
        self._count = 0  # chunks emitted
        # Where the next chunk's overlap may start: the trailing text of the chunk just emitted.
        self._overlap_from: tuple[int, int] | None = None

    def add(self, unit: Unit) -> Iterator[Chunk]:
        if unit.kind == "heading":
            if self._open is not None and self._open.has_content():
                yield from self.flush()
            self._overlap_from = None  # a new section repeats nothing of the one before
            level = unit.level
            self._headings = [h for h in self._headings if h[0] < level]
            self._headings.append((level, heading_text(self._doc.text(unit.segments[0]))))
            self._append(_Piece(unit.start, unit.end, unit.segments, unit))
            return
        tokens = self._fits(unit.start, unit.end)
        if tokens is None and self._open is not None and self._open.has_content():
            yield from self.flush()
            tokens = self._fits(unit.start, unit.end)
        if tokens is not None:
            self._append(_Piece(unit.start, unit.end, unit.segments, unit), tokens)
            return
        alone = self._open.own_start if self._open is not None else unit.start
        if unit.kind != "text" or self._counter.count(self._md[alone : unit.end]) <= self._max:
            # Whole, without the overlap that made it too long; a table, equation or figure also
            # when it is too long alone: a chunk of its own (with the headings above it).
            self._drop_overlap()
            self._append(_Piece(unit.start, unit.end, unit.segments, unit))
            return
        yield from self._split(unit)

    def flush(self) -> Iterator[Chunk]:
        """Emit the open chunk, if any, and remember where the next one may overlap it."""
        chunk, self._open = self._open, None
        if chunk is None or not chunk.pieces:
            return
        last = chunk.pieces[-1]
        self._overlap_from = None
        if self._overlap and last.unit.kind == "text":
            # Only the text at the chunk's end may be repeated: never part of a table or heading.
            first = last
            for piece in reversed(chunk.pieces):
                if piece.unit.kind != "text":
                    break
                first = piece
            self._overlap_from = (max(first.start, chunk.own_start), last.end)
        yield self._chunk(chunk)

    def _append(self, piece: _Piece, tokens: int | None = None) -> None:
        """Add ``piece`` to the open chunk (opening one if needed); ``tokens`` is the chunk's count
        with it, as ``_fits`` gave it, or None to count it here."""
        if self._open is None:
            self._open = _Open(start=self._overlap_start(piece.start), own_start=piece.start)
            self._tokens = 0
        if tokens is None:
            since = self._open.end if self._open.pieces else self._open.start
            tokens = self._tokens + self._counter.count(self._md[since : piece.end])
        self._tokens = tokens
        self._open.pieces.append(piece)

    def _fits(self, start: int, end: int) -> int | None:
        """The open chunk's tokens if its text ran on to ``end`` (or those of a new chunk whose own
        text starts at ``start``); None when that passes ``max_tokens``.

        Counting the whole chunk again for every block would tokenize a long document many times
        over: the text added is counted alone and its count added, and the chunk is counted whole
        only when the sum comes within a token per part of the limit (tokenizers split at the
        whitespace between blocks, so parts seldom merge into more tokens, never by more than that).
        """
        if self._open is None:
            tokens = self._counter.count(self._md[self._overlap_start(start) : end])
            return tokens if tokens <= self._max else None
        estimate = self._tokens + self._counter.count(self._md[self._open.end : end])
        if estimate + len(self._open.pieces) + 1 <= self._max:
            return estimate
        exact = self._counter.count(self._md[self._open.start : end])
        return exact if exact <= self._max else None

    def _drop_overlap(self) -> bool:
        """Start the next chunk without overlap; False when there was none to drop."""
        dropped = self._overlap_from is not None
        self._overlap_from = None
        if self._open is not None and not self._open.has_content():
            dropped = dropped or self._open.start != self._open.own_start
            self._open.start = self._open.own_start
        return dropped

    def _overlap_start(self, own_start: int) -> int:
        """Where a chunk whose own content starts at ``own_start`` starts, overlap included."""
        if self._overlap_from is None:
            return own_start
        first, last = self._overlap_from
        tail = self._md[first:last]
        start = first + self._counter.suffix_start(tail, self._overlap)
        if start > first and not self._md[start - 1].isspace():
            # Mid-word: move on to the next word, so the overlap never begins with half of one.
            # Text written without spaces (Chinese, Japanese) keeps the tokenizer's boundary.
            space = _SPACE.search(self._md, start, min(last, start + _LONGEST_WORD))
            start = space.end() if space else start
        return start if start < last else own_start

    def _split(self, unit: Unit) -> Iterator[Chunk]:
        """A text unit too long for one chunk, cut into chunks that each fit."""
        position = unit.start
        while position < unit.end:
            if self._open is None:
                self._open = _Open(start=self._overlap_start(position), own_start=position)
            start = self._open.start
            budget_end = self._budget_end(start, unit.end)
            if budget_end >= unit.end:
                tokens = self._counter.count(self._md[start : unit.end])
                self._append(_Piece(position, unit.end, unit.segments, unit), tokens)
                return
            cut = self._cut(position, budget_end)
            # Offsets come from tokenizing the whole text; the slice, tokenized alone, may differ
            # by a token at the cut: shrink until it truly fits.
            while cut > position and self._counter.count(self._md[start:cut].rstrip()) > self._max:
                cut = self._cut(position, cut - 1)
            if cut <= position:
                if self._drop_overlap():
                    continue  # retry with the room the overlap took
                # Only the headings are in the chunk and they leave no room: take one token anyway.
                cut = position + max(1, self._counter.prefix_end(self._md[position : unit.end], 1))
            end = len(self._md[position:cut].rstrip()) + position
            self._open.pieces.append(_Piece(position, end, unit.segments, unit))
            yield from self.flush()
            space = _SPACE.match(self._md, cut)
            position = space.end() if space else cut

    def _budget_end(self, start: int, end: int) -> int:
        """Where the first ``max_tokens`` tokens of ``full_md[start:end]`` end.

        Only a window a little longer than the budget can be is tokenized, widened while it is too
        short, so a paragraph of a megabyte is not tokenized again for every chunk cut from it.
        """
        window = self._max * 8 + 64
        while True:
            stop = min(end, start + window)
            cut = start + self._counter.prefix_end(self._md[start:stop], self._max)
            if cut < stop or stop == end:
                return cut
            window *= 2

    def _cut(self, start: int, limit: int) -> int:
        """The best place to cut text between ``start`` and ``limit``: after the last sentence end,
        else before the last word, else ``limit`` itself (at or before ``start`` when there is no
        room)."""
        window = self._md[start:limit]
        # A sentence end in the first half would leave a short chunk: a word boundary does better.
        ends = [m.end() for m in _SENTENCE_END.finditer(window) if m.end() >= len(window) // 2]
        if ends:
            return start + ends[-1]
        spaces = [m.start() for m in _SPACE.finditer(window, max(1, len(window) - _LONGEST_WORD))]
        if spaces:
            return start + spaces[-1]
        return limit

    def _chunk(self, open_chunk: _Open) -> Chunk:
        segments = [s for piece in open_chunk.pieces for s in piece.segments]
        blocks: list[ChunkBlock] = []
        seen: set[tuple[int, int]] = set()
        for segment in segments:
            if segment.block is None or (segment.page.index, segment.block) in seen:
                continue
            seen.add((segment.page.index, segment.block))
            stored = segment.page.blocks[segment.block]
            blocks.append(
                ChunkBlock(
                    page=segment.page.page,
                    index=segment.page.index,
                    block=segment.block,
                    type=stored.type,
                    bbox=stored.bbox,
                    bbox_norm=stored.bbox_norm,
                    bbox_pt=stored.bbox_pt,
                    boxes=stored.boxes,
                    boxes_pt=stored.boxes_pt,
                )
            )
        figures: list[ChunkFigure] = []
        counted: set[int] = set()
        for piece in open_chunk.pieces:
            if piece.unit.kind != "figure" or id(piece.unit) in counted:
                continue
            counted.add(id(piece.unit))
            caption = "\n\n".join(self._doc.text(s) for s in piece.unit.captions) or None
            for link in piece.unit.links:
                name, block = link.image_name, link.block
                if name is None or block is None:
                    continue
                figures.append(
                    ChunkFigure(
                        name=name,
                        link=self._link_base + name,
                        caption=caption,
                        page=link.page.page,
                        block=block,
                    )
                )
        text = self._md[open_chunk.start : open_chunk.end]
        chunk = Chunk(
            index=self._count,
            text=text,
            tokens=self._counter.count(text),
            headings=[text for _, text in self._headings],
            pages=sorted({s.page.page for s in segments}),
            start=open_chunk.start,
            end=open_chunk.end,
            overlap_chars=open_chunk.own_start - open_chunk.start,
            blocks=blocks,
            figures=figures,
        )
        self._count += 1
        return chunk
