"""The model's raw grounded output to blocks.

DeepSeek-OCR writes a page as a run of headers, each followed by that block's content::

    <|ref|>title<|/ref|><|det|>[[62, 40, 512, 71]]<|/det|>
    # Annual report

The text is untrusted: boxes are parsed as data (never ``eval``), malformed or truncated tags are
tolerated, and a page that never reached ``END_MARKER`` is cut at its repeating tail and flagged.
"""

from __future__ import annotations

import ast
import json
import math
import re
from dataclasses import dataclass

from app.engines.base import END_MARKER

PAD_MARKER = "<｜▁pad▁｜>"
"""DeepSeek's padding token; batched generation may leave it in a page's text."""

Box = tuple[int, int, int, int]

_TAGS = ("<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>")
# A tag cut off by the end of the text (`\Z`) still counts, so nothing of it leaks into content.
_HEADER = re.compile(
    r"<\|ref\|>(?P<label>[^<]*)(?:<\|/ref\|>|\Z)"
    r"(?:\s*<\|det\|>(?P<det>[^<]*)(?:<\|/det\|>|\Z))?"
)
# A det without its ref goes whole (its box list is not content); any other lone tag goes alone.
_STRAY = re.compile(r"<\|det\|>[^<]*(?:<\|/det\|>|\Z)|<\|/?(?:ref|det|grounding)\|>")
_MAX_DET_CHARS = 10_000  # a det longer than this is runaway output, not boxes worth parsing

_MAX_PERIOD = 2000  # chars; the longest repeating unit looked for (a whole block with its header)
_MIN_REPEATS = 3
_MIN_TAIL = 60  # chars the repeating tail must cover...
_SHORT_UNIT = 2  # ...except for units this short ("....", "0 0 "), which need only
_SHORT_TAIL = 40
# Where a kept copy may begin or end, best first: after a block, after a line, between an element
# and the next one opening, after a word.
_BOUNDARIES = tuple(re.compile(p) for p in (r"(?<=\n\n)", r"(?<=\n)", r"(?<=>)(?=<[^/])", r"(?<=\s)"))


@dataclass(frozen=True)
class Block:
    """One region of the page: its label, its boxes on the model's 0-999 scale and its content."""

    label: str  # "title", "text", "image", "table", ...; unknown labels kept as given, stripped
    # Clamped to [0, 999], each x0 <= x1 and y0 <= y1, zero-area boxes dropped; empty when the det
    # was malformed or missing.
    boxes: tuple[Box, ...]
    content: str  # Markdown, HTML or LaTeX, without grounding tags or surrounding whitespace


@dataclass(frozen=True)
class ParsedPage:
    """A page's blocks in reading order, and whether the model finished the page."""

    blocks: list[Block]
    finished: bool  # the raw text reached END_MARKER
    # None when finished; else "repetition" | "max_tokens" | "timeout" | "incomplete"
    truncated_reason: str | None


def parse_page(raw: str, stop_reason: str | None = None) -> ParsedPage:
    """Parse one page of raw model output; never raises on malformed text.

    Text after ``END_MARKER`` is ignored. An unfinished page is first cut at its repeating tail
    (``truncated_reason="repetition"``); otherwise its reason is ``stop_reason`` when that is
    ``"max_tokens"`` or ``"timeout"``, else ``"incomplete"``. Text before the first header becomes a
    ``text`` block without boxes; blocks with neither boxes nor content are dropped.
    """
    finished = END_MARKER in raw
    text = raw.split(END_MARKER, 1)[0].replace(PAD_MARKER, "")
    reason: str | None = None
    if not finished:
        text, repeated = cut_repetition(text)
        if repeated:
            reason = "repetition"
        elif stop_reason in ("max_tokens", "timeout"):
            reason = stop_reason
        else:
            reason = "incomplete"
    text = _drop_partial_tag(text)

    blocks: list[Block] = []
    boxes: tuple[Box, ...] = ()
    label, start = "text", 0
    for header in _HEADER.finditer(text):
        _add_block(blocks, label, boxes, text[start : header.start()])
        label = header["label"].strip() or "text"
        boxes = _parse_boxes(header["det"])
        start = header.end()
    _add_block(blocks, label, boxes, text[start:])
    return ParsedPage(blocks=blocks, finished=finished, truncated_reason=reason)


def cut_repetition(text: str) -> tuple[str, bool]:
    """Cut a runaway repeating tail down to one copy of its unit.

    The unit may be anything from one character to a whole block with its header (up to
    ``_MAX_PERIOD`` characters); the text may end with a partial copy. The tail counts as runaway
    when it repeats a unit at least ``_MIN_REPEATS`` times over at least ``_MIN_TAIL`` characters
    (``_SHORT_TAIL`` for units of up to ``_SHORT_UNIT`` characters). Among the units that qualify,
    the one whose repetition starts earliest wins, so a looping block is cut as a block even when it
    ends with a run of dots.

    Returns ``(text before the repetition + one copy of the unit, True)``, the copy ending at a
    block, line, element or word boundary where the unit has one; else ``(text, False)``.
    """
    n = len(text)
    best: tuple[int, int] | None = None  # (start of the repeating tail, period)
    for period in range(1, min(_MAX_PERIOD, n // _MIN_REPEATS) + 1):
        # The tail must repeat from `last` on to count; once a repetition is found, only one
        # reaching further back can beat it (a multiple of its period never does, and fails the
        # first character test).
        last = n - _min_tail(period)
        if best is not None:
            last = min(last, best[0] - 1)
        if last < 0 or text[last] != text[last + period] or not _periodic_from(text, last, period):
            continue
        best = (_tail_start(text, period, last), period)
    if best is None:
        return text, False
    start, period = best
    cut = start + period
    # The repetition may have matched a few characters of the text before it, so the copy from
    # `start` can be a rotation of the unit that begins and ends mid-word. Keep the rotation that
    # starts or ends at the strongest boundary instead, reaching less than a period further.
    for boundary in _BOUNDARIES:
        if start == 0 or boundary.match(text, start):
            break
        match = boundary.search(text, cut, min(n, cut + period))
        if match:
            return text[: match.start()], True
    return text[:cut], True


def _min_tail(period: int) -> int:
    """How many characters a repeating tail with this period must cover to count as runaway."""
    return max(_MIN_REPEATS * period, _SHORT_TAIL if period <= _SHORT_UNIT else _MIN_TAIL)


def _periodic_from(text: str, start: int, period: int) -> bool:
    """Whether ``text[i] == text[i + period]`` for every ``i >= start``."""
    # Compare in doubling chunks: a mismatch, the common case, is found without copying the tail.
    end = len(text) - period
    i, step = start, 64
    while i < end:
        stop = min(end, i + step)
        if text[i:stop] != text[i + period : stop + period]:
            return False
        i, step = stop, step * 2
    return True


def _tail_start(text: str, period: int, known: int) -> int:
    """The smallest ``start`` for which ``text[start:]`` repeats with ``period``.

    ``text[known:]`` is known to repeat; the predicate is monotone, so binary search applies.
    """
    lo, hi = 0, known
    while lo < hi:
        mid = (lo + hi) // 2
        if _periodic_from(text, mid, period):
            hi = mid
        else:
            lo = mid + 1
    return lo


def _drop_partial_tag(text: str) -> str:
    """Remove a tag cut off at the end of the text, like ``<|re`` or ``<|/de``."""
    for tag in _TAGS:
        for length in range(len(tag) - 1, 1, -1):
            if text.endswith(tag[:length]):
                return text[:-length]
    return text


def _add_block(blocks: list[Block], label: str, boxes: tuple[Box, ...], content: str) -> None:
    content = _STRAY.sub("", content).strip()
    if boxes or content:
        blocks.append(Block(label=label, boxes=boxes, content=content))


def _parse_boxes(det: str | None) -> tuple[Box, ...]:
    """Boxes from a det's text, ``[[x0, y0, x1, y1], ...]`` or one bare ``[x0, y0, x1, y1]``."""
    if not det or len(det) > _MAX_DET_CHARS:
        return ()
    try:
        value = json.loads(det)
    except (ValueError, RecursionError):
        try:
            # Accepts what JSON refuses (tuples, trailing commas) and only ever builds literals.
            value = ast.literal_eval(det.strip())
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            return ()
    if not isinstance(value, list | tuple):
        return ()
    entries = [value] if len(value) == 4 and all(_is_number(v) for v in value) else value
    boxes = (_clean_box(entry) for entry in entries)
    return tuple(box for box in boxes if box is not None)


def _is_number(value: object) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    # A huge int is fine (it is clamped), but math.isfinite would overflow converting it.
    return isinstance(value, int) and not isinstance(value, bool)


def _clean_box(entry: object) -> Box | None:
    """Round, clamp to [0, 999] and order one box; None when it is not 4 numbers or has no area."""
    if not isinstance(entry, list | tuple) or len(entry) != 4 or not all(_is_number(v) for v in entry):
        return None
    x0, y0, x1, y1 = (min(999, max(0, round(v))) for v in entry)
    x0, x1 = sorted((x0, x1))
    y0, y1 = sorted((y0, y1))
    if x0 == x1 or y0 == y1:
        return None
    return x0, y0, x1, y1
