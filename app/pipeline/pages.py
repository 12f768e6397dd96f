"""Documents to page images: PDFs rendered with PyMuPDF, images decoded with Pillow."""

from __future__ import annotations

import math
import re
import struct
import threading
import warnings
from collections.abc import Generator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pymupdf
from PIL import ExifTags, Image

from app.errors import InvalidDocument, InvalidOptions
from app.pipeline.sniff import DocumentKind


@dataclass
class PageImage:
    """One rendered page, ready for the engine."""

    number: int  # 1-based page number in the source document
    image: Image.Image  # RGB
    dpi: float | None  # render resolution for PDFs (after any pixel-limit scaling); None for images


# --- page selection -------------------------------------------------------------------------------

_MAX_SPEC_CHARS = 1000  # a page spec longer than this is a mistake, not a selection
_RANGE = re.compile(r"\s*(\d+)\s*(?:(-)\s*(\d*)\s*)?")


def validate_page_spec(spec: str) -> None:
    """Check the syntax of a page spec such as ``"1-3,7,10-"`` before the page count is known.

    Raises ``InvalidOptions`` for bad syntax, page 0 and reversed ranges.
    """
    _parse_spec(spec)


def select_pages(spec: str | None, page_count: int) -> list[int]:
    """Return the sorted, unique 1-based page numbers a spec selects in a document of ``page_count``.

    ``None`` or a blank spec selects every page; ``"5-"`` runs to the last page. Raises
    ``InvalidOptions`` for anything ``validate_page_spec`` refuses and for pages past the end.
    """
    if spec is None or not spec.strip():
        return list(range(1, page_count + 1))
    selected: set[int] = set()
    for first, last in _parse_spec(spec):
        end = page_count if last is None else last
        if max(first, end) > page_count:
            raise InvalidOptions(_out_of_range(max(first, end), page_count))
        selected.update(range(first, end + 1))
    return sorted(selected)


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


def _out_of_range(number: int, page_count: int) -> str:
    pages = "page" if page_count == 1 else "pages"
    return f"page {number} is out of range: the document has {page_count} {pages}"


# --- counting and rendering -----------------------------------------------------------------------

# A declared image size may exceed ``max_pixels`` by this factor and still be decoded (then scaled
# down); past it the file is refused before any pixel is decoded.
_BOMB_FACTOR = 4
_PIL_FORMATS = {
    DocumentKind.PNG: "PNG",
    DocumentKind.JPEG: "JPEG",
    DocumentKind.WEBP: "WEBP",
    DocumentKind.TIFF: "TIFF",
    DocumentKind.BMP: "BMP",
}
# What Pillow raises for a file it cannot parse or decode (its plugins are not consistent).
_IMAGE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    KeyError,
    struct.error,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,
)
_PDF_ERRORS = (RuntimeError, ValueError, pymupdf.mupdf.FzErrorBase)
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_ORIENTATION = {  # EXIF orientation tag -> the transpose that makes the image upright
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# PyMuPDF does not support use from several threads at once, even on separate documents (they share
# MuPDF's context); submit-time counting and the workers' rendering run in threads, so every MuPDF
# call takes this lock. Rendering is short next to recognition, so queueing on it costs little.
_MUPDF_LOCK = threading.Lock()
# ``warnings.catch_warnings`` swaps the process-wide filter list; two threads interleaving it can
# leave one's filter installed for good, so our own uses take turns.
_WARNINGS_LOCK = threading.Lock()


def count_pages(path: Path, kind: DocumentKind, *, max_pixels: int | None = None) -> int:
    """Open the document and return its page count (frames for a multi-frame TIFF; 1 for other images).

    Raises ``InvalidDocument`` for a corrupt or truncated file, a PDF that needs a password, a PDF
    with no pages, or an image whose declared size is a decompression bomb: over Pillow's own
    limit, or over ``4 * max_pixels`` when ``max_pixels`` is given. No pixels are decoded.
    """
    if kind is DocumentKind.PDF:
        with _open_pdf(path) as (_, page_count):
            return page_count
    limit = _declared_limit(max_pixels)
    with _open_image(path, kind) as image:
        try:
            count = _frame_count(image, kind)
            for number in range(1, count + 1):
                _check_declared_size(image, number, limit)
            # Pillow walks a PNG's chunks and their CRCs here, so truncation shows now rather than
            # mid-task; for the other formats damage shows when a page is decoded.
            image.verify()
        except _IMAGE_ERRORS as exc:
            raise InvalidDocument(f"the image cannot be read: {exc}") from exc
    return count


def render_pages(
    path: Path, kind: DocumentKind, numbers: Sequence[int], *, dpi: float, max_pixels: int
) -> Generator[PageImage, None, None]:
    """Yield the given 1-based pages as RGB images, one at a time and only as they are pulled.

    PDF pages are rendered at ``dpi``, or lower where that would pass ``max_pixels`` (the dpi used
    is reported). Images are made RGB (transparency onto white), turned upright by their EXIF
    orientation and scaled down to ``max_pixels``. Raises ``InvalidDocument`` naming the page when
    one cannot be rendered, and ``InvalidOptions`` for a page number past the end.
    """
    if kind is DocumentKind.PDF:
        yield from _render_pdf(path, numbers, dpi=dpi, max_pixels=max_pixels)
    else:
        yield from _render_image(path, kind, numbers, max_pixels=max_pixels)


# --- PDF ------------------------------------------------------------------------------------------


@contextmanager
def _open_pdf(path: Path) -> Iterator[tuple[pymupdf.Document, int]]:
    """Open a PDF that can be rendered; yields it with its page count."""
    with _MUPDF_LOCK:
        try:
            document = pymupdf.open(path, filetype="pdf")
        except _PDF_ERRORS as exc:
            # MuPDF's message names our storage path; say what went wrong instead.
            raise InvalidDocument("the PDF cannot be opened: it is damaged or not a PDF") from exc
    try:
        with _MUPDF_LOCK:
            needs_password, page_count = document.needs_pass, document.page_count
        if needs_password:
            raise InvalidDocument("the PDF is encrypted and needs a password")
        if page_count == 0:
            raise InvalidDocument("the PDF has no pages")
        yield document, page_count
    finally:
        with _MUPDF_LOCK:
            document.close()


def _render_pdf(path: Path, numbers: Sequence[int], *, dpi: float, max_pixels: int) -> Iterator[PageImage]:
    with _open_pdf(path) as (document, page_count):
        for number in numbers:
            _check_in_range(number, page_count)
            try:
                with _MUPDF_LOCK:
                    image, zoom = _render_pdf_page(document, number, dpi / 72, max_pixels)
            except _PDF_ERRORS as exc:
                raise InvalidDocument(f"page {number} cannot be rendered: {exc}") from exc
            yield PageImage(number=number, image=image, dpi=zoom * 72)


def _render_pdf_page(
    document: pymupdf.Document, number: int, zoom: float, max_pixels: int
) -> tuple[Image.Image, float]:
    """Render one page; MuPDF's page and pixmap are freed on return, so never held across a yield."""
    page = document.load_page(number - 1)
    zoom = _fit_zoom(page.rect.width, page.rect.height, zoom, max_pixels)
    pixmap = page.get_pixmap(matrix=pymupdf.Matrix(zoom, zoom), colorspace=pymupdf.csRGB, alpha=False)
    return Image.frombytes("RGB", (pixmap.width, pixmap.height), pixmap.samples_mv), zoom


def _fit_zoom(width: float, height: float, zoom: float, max_pixels: int) -> float:
    """Return ``zoom``, or the largest zoom below it whose pixmap has at most ``max_pixels``."""
    if width <= 0 or height <= 0:
        raise ValueError("the page has no area")
    if math.ceil(width * zoom) * math.ceil(height * zoom) <= max_pixels:
        return zoom
    # MuPDF rounds the pixmap outwards to whole pixels, so solve (w*z + 1) * (h*z + 1) = max_pixels:
    # a pixel of room on each axis keeps the rounded size within the limit.
    a, b, c = width * height, width + height, 1 - max_pixels
    return (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)


# --- images ---------------------------------------------------------------------------------------


def _declared_limit(max_pixels: int | None) -> int | None:
    """The largest declared image size (pixels) we agree to decode; ``None`` leaves it to Pillow."""
    if max_pixels is None:
        return None
    limit = _BOMB_FACTOR * max_pixels
    # Pillow warns while loading anything over its own (global, read-only here) limit; staying under
    # it means that warning never fires from our decoding.
    pillow_limit = Image.MAX_IMAGE_PIXELS
    return limit if pillow_limit is None else min(limit, pillow_limit)


@contextmanager
def _open_image(path: Path, kind: DocumentKind) -> Iterator[Image.Image]:
    """Open an image lazily (header only); Pillow's bomb check refuses, never just warns."""
    try:
        with _WARNINGS_LOCK, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path, formats=[_PIL_FORMATS[kind]])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidDocument(f"the image is too large to decode safely: {exc}") from exc
    except _IMAGE_ERRORS as exc:
        # Pillow's message names our storage path; say what went wrong instead.
        raise InvalidDocument(f"the file cannot be read as {kind.value.upper()}: it is damaged") from exc
    with image:
        yield image


def _frame_count(image: Image.Image, kind: DocumentKind) -> int:
    # Only TIFF frames are pages; the extra frames of an animated PNG or WebP, or a JPEG's MPF
    # previews, are not.
    return getattr(image, "n_frames", 1) if kind is DocumentKind.TIFF else 1


def _check_in_range(number: int, page_count: int) -> None:
    if not 1 <= number <= page_count:
        raise InvalidOptions(_out_of_range(number, page_count))


def _check_declared_size(image: Image.Image, number: int, limit: int | None) -> None:
    """Seek to page ``number`` and refuse it if its declared size is over ``limit`` pixels."""
    image.seek(number - 1)
    width, height = image.size
    if limit is not None and width * height > limit:
        raise InvalidDocument(
            f"page {number} is {width}x{height} pixels, over the limit of {limit} pixels "
            "(a decompression bomb?)"
        )


def _render_image(
    path: Path, kind: DocumentKind, numbers: Sequence[int], *, max_pixels: int
) -> Iterator[PageImage]:
    limit = _declared_limit(max_pixels)
    with _open_image(path, kind) as image:
        try:
            count = _frame_count(image, kind)
        except _IMAGE_ERRORS as exc:
            raise InvalidDocument(f"the image cannot be read: {exc}") from exc
        for number in numbers:
            _check_in_range(number, count)
            try:
                _check_declared_size(image, number, limit)
                page = _decode_frame(image, max_pixels)
            except _IMAGE_ERRORS as exc:
                raise InvalidDocument(f"page {number} cannot be decoded: {exc}") from exc
            yield PageImage(number=number, image=page, dpi=None)


def _decode_frame(image: Image.Image, max_pixels: int) -> Image.Image:
    """Decode the current frame to an upright RGB image of at most ``max_pixels``."""
    orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    target = _fit_size(image.size, max_pixels)
    if target != image.size:
        # JPEG decodes straight to 1/2, 1/4 or 1/8 scale, so a large photo never exists at full
        # size in memory; other formats ignore this.
        image.draft(None, target)
    frame = _to_rgb(image)
    if frame.size != target:
        frame = frame.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)
    transpose = _ORIENTATION.get(orientation)
    # Rotating after scaling is cheaper and keeps the pixel count, so the limit still holds.
    return frame.transpose(transpose) if transpose is not None else frame


def _fit_size(size: tuple[int, int], max_pixels: int) -> tuple[int, int]:
    """Scale ``size`` down, keeping its aspect ratio, to at most ``max_pixels``."""
    width, height = size
    if width * height <= max_pixels:
        return size
    scale = math.sqrt(max_pixels / (width * height))
    new_width = max(1, int(width * scale))
    return new_width, max(1, min(int(height * scale), max_pixels // new_width))


def _to_rgb(image: Image.Image) -> Image.Image:
    """Return a new RGB image: 16-bit and float greys stretched to 8 bits, transparency onto white."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        # ``convert("L")`` clips 16-bit values at 255 (a white page); stretch the used range instead,
        # which also lifts 10- and 12-bit scans stored in 16 bits.
        grey = image.convert("F")
        low, high = cast("tuple[float, float]", grey.getextrema())
        scale = 255 / (high - low) if high > low else 1.0
        image = grey.point(lambda value: value * scale - low * scale).convert("L")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        page = Image.new("RGB", rgba.size, "white")
        page.paste(rgba, mask=rgba.getchannel("A"))
        return page
    return image.convert("RGB")
