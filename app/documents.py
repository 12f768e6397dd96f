"""What a document is, and which of its pages a task asks for: words every layer shares.

``DocumentKind`` is decided from a document's bytes (``app.pipeline.sniff``); the page selection
(``"1-3,7,10-"``) is checked when a task is submitted (``app.records``) and applied when the
document's page count is known (``app.pipeline.pages``).
"""

from __future__ import annotations

import re
from enum import StrEnum

from app.errors import InvalidOptions, TooManyPages


class DocumentKind(StrEnum):
    """A document type the pipeline can turn into page images."""

    PDF = "pdf"
    PNG = "png"
    JPEG = "jpeg"
    WEBP = "webp"
    TIFF = "tiff"
    BMP = "bmp"

    @property
    def content_type(self) -> str:
        """The media type to report for this kind, e.g. ``application/pdf``."""
        if self is DocumentKind.PDF:
            return "application/pdf"
        return f"image/{self.value}"

    @property
    def extension(self) -> str:
        """The usual file extension, dot included, for names that have none."""
        return ".jpg" if self is DocumentKind.JPEG else f".{self.value}"


_MAX_SPEC_CHARS = 1000  # a page spec longer than this is a mistake, not a selection
_RANGE = re.compile(r"\s*(\d+)\s*(?:(-)\s*(\d*)\s*)?")


def validate_page_spec(spec: str) -> None:
    """Check the syntax of a page spec such as ``"1-3,7,10-"`` before the page count is known.

    Raises ``InvalidOptions`` for bad syntax, page 0 and reversed ranges.
    """
    _parse_spec(spec)


def select_pages(spec: str | None, page_count: int, *, max_pages: int | None = None) -> list[int]:
    """Return the sorted, unique 1-based page numbers a spec selects in a document of ``page_count``.

    ``None`` or a blank spec selects every page; ``"5-"`` runs to the last page. Raises
    ``InvalidOptions`` for anything ``validate_page_spec`` refuses and for pages past the end, and
    ``TooManyPages`` when more than ``max_pages`` are selected; that is found before any list is
    built, so a document claiming billions of pages costs nothing.
    """
    if spec is None or not spec.strip():
        ranges = [(1, page_count)]
    else:
        ranges = []
        for first, last in _parse_spec(spec):
            end = page_count if last is None else last
            if max(first, end) > page_count:
                raise InvalidOptions(out_of_range(max(first, end), page_count))
            ranges.append((first, end))
    if max_pages is not None:
        selected = _count_selected(ranges)
        if selected > max_pages:
            raise TooManyPages(
                f"{selected} pages selected; the limit is {max_pages} (APP_MAX_PAGES). "
                'Select fewer with the "pages" option.'
            )
    return sorted({number for first, end in ranges for number in range(first, end + 1)})


def _count_selected(ranges: list[tuple[int, int]]) -> int:
    """How many distinct pages the closed ``(first, last)`` ranges cover, overlaps counted once."""
    total, covered = 0, 0  # ``covered``: the highest page counted so far
    for first, last in sorted(ranges):
        if last > covered:
            total += last - max(first, covered + 1) + 1
            covered = last
    return total


def _parse_spec(spec: str) -> list[tuple[int, int | None]]:
    """Split a spec into ``(first, last)`` ranges; ``last`` is ``None`` for an open range."""
    if len(spec) > _MAX_SPEC_CHARS:
        raise InvalidOptions(f"the page selection is longer than {_MAX_SPEC_CHARS} characters")
    ranges: list[tuple[int, int | None]] = []
    for item in spec.split(","):
        match = _RANGE.fullmatch(item)
        if match is None:
            raise InvalidOptions(
                f"invalid page selection {spec!r}: {item.strip()!r} is not a page or a range "
                "(use a form like '1-3,7,10-')"
            )
        first = int(match[1])
        last = None if match[2] and not match[3] else int(match[3] or first)
        if first == 0 or last == 0:
            raise InvalidOptions(f"invalid page selection {spec!r}: pages are numbered from 1")
        if last is not None and last < first:
            raise InvalidOptions(f"invalid page selection {spec!r}: the range {first}-{last} is reversed")
        ranges.append((first, last))
    return ranges


def out_of_range(number: int, page_count: int) -> str:
    """The message for a page number past the end of a document of ``page_count`` pages."""
    pages = "page" if page_count == 1 else "pages"
    return f"page {number} is out of range: the document has {page_count} {pages}"
