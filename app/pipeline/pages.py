"""Documents to page images: PDFs rendered with PyMuPDF, images decoded with Pillow.

Everything here blocks, and bounds what it counts (frames, chunks, selected pages: never past the
limit plus one) but not the time or memory a crafted file costs: the service calls it only inside
its render processes (``app.pipeline.render_pool``), which kill a page past its deadline or
memory ceiling. In the same process MuPDF would also hold the GIL for as long as it renders.
"""

from __future__ import annotations

import math
import os
import struct
import sys
import threading
import warnings
from abc import ABC, abstractmethod
from collections.abc import Generator, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self, cast

import pymupdf
from PIL import ExifTags, Image

from app import lossless
from app.documents import DocumentKind, out_of_range, select_pages
from app.errors import InvalidDocument, InvalidOptions, RenderMemoryExceeded, TooManyPages


class PageImage:
    """One rendered page, ready for the engine: its pixels, or the lossless encoding they come in.

    A page rendered in this process has its pixels (``image``); one rendered in a render process
    comes encoded alone (``app.lossless``: most pages need no pixels in the service, whose engine
    is sent the encoded page as it is), and ``image`` decodes it on first use, once, in whichever
    thread asks first (keep that off the event loop: about 10 ms a page).
    """

    def __init__(
        self,
        *,
        number: int,
        dpi: float | None,
        image: Image.Image | None = None,
        encoded: lossless.Encoded | None = None,
        text_layer: str | None = None,
        has_ink: bool = True,
    ) -> None:
        """``image`` (RGB), or ``encoded`` (``lossless.encode`` of it, its size checked)."""
        if image is not None:
            size = image.size
        elif encoded is not None:
            size = encoded.size
        else:
            raise ValueError("a page needs its pixels, or their lossless encoding")
        self.number = number  # 1-based page number in the source document
        # render resolution for PDFs (after any pixel-limit scaling); None for images
        self.dpi = dpi
        self.encoded = encoded  # when a render process made the page
        # The PDF page's own text, at most TEXT_LAYER_MAX_CHARS of it; None for images, pages
        # without text and pages whose text could not be extracted. What the recognised text is
        # measured against (``app.pipeline.quality``).
        self.text_layer = text_layer
        self.has_ink = has_ink  # ``has_ink(image)``: whether the pixels show anything at all
        self._image = image
        self._size = size
        self._decoding = threading.Lock()

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels, known without decoding anything."""
        return self._size

    def encoded_data(self) -> bytes:
        """The page's lossless encoding: the render process's, or made here from its pixels
        (blocking)."""
        return self.encoded.data if self.encoded is not None else lossless.encode(self.image)

    @property
    def image(self) -> Image.Image:
        """The page in RGB (decoded the first time; blocking)."""
        with self._decoding:
            if self._image is None or self._image.mode != "RGB":
                # A grey page is encoded with one channel: RGB again, same values.
                self._image = self._decode().convert("RGB")
            return self._image

    def crop(self, box: tuple[int, int, int, int]) -> Image.Image:
        """The pixels in ``box`` (left, top, right, bottom), in RGB (blocking: decodes the page
        the first time, but leaves a grey page one channel: a figure's crop costs a third as much)."""
        with self._decoding:
            if self._image is None:
                self._image = self._decode()
            return self._image.crop(box).convert("RGB")

    def forget_pixels(self) -> None:
        """Drop the pixels decoded from the page's encoding (decoded again if asked for): a page
        kept waiting for its turn after its crops were cut holds its encoding alone."""
        if self.encoded is not None:
            with self._decoding:
                self._image = None

    def _decode(self) -> Image.Image:
        assert self.encoded is not None
        return lossless.decode(self.encoded.data)


TEXT_LAYER_MAX_CHARS = 200_000
"""The most of a page's text layer kept: a dense page of 6-point text holds about 15,000
characters; past this it is text no one sees (or a crafted file), and the model's output, capped
by its tokens, could never match it anyway."""

# PyMuPDF's flags for get_text("text") (ligatures and whitespace kept, text outside the page left
# out, unknown characters as their font's code), and words split at a line's end hyphen joined.
_TEXT_FLAGS = pymupdf.TEXTFLAGS_TEXT | pymupdf.TEXT_DEHYPHENATE

# A pixel is ink when darker than this (0-255, after halving the page: below); light grey
# show-through and scanner noise are not.
_INK_LEVEL = 160
_INK_MIN_SHARE = 1e-4  # of the pixels, for a page to have content: a word or two
_INK_MARGIN = 0.03  # of each side, left out: a scan's dark edges are not content


def has_ink(image: Image.Image) -> bool:
    """Whether the page shows anything: at least 0.01 % of its pixels, away from its edges, are dark.

    The page is halved first (each pixel the mean of four), so a speck of one dark pixel stays
    light while a stroke of text stays dark. About 2 ms for a page of 1190x1684 pixels.
    """
    grey = image.convert("L").reduce(2)
    width, height = grey.size
    dx, dy = int(width * _INK_MARGIN), int(height * _INK_MARGIN)
    inner = grey.crop((dx, dy, width - dx, height - dy))
    dark = sum(inner.histogram()[:_INK_LEVEL])
    return dark >= _INK_MIN_SHARE * inner.width * inner.height


@dataclass(frozen=True)
class Inspection:
    """What the submit-time check learnt of a document."""

    page_count: int  # pages in the document (frames of a TIFF)
    numbers: list[int]  # the 1-based pages its ``pages`` selection picks, each one known to load


# --- counting and rendering -----------------------------------------------------------------------

# A declared image size may exceed ``max_pixels`` by this factor and still be decoded (then scaled
# down); past it the file is refused before any pixel is decoded.
_BOMB_FACTOR = 4
# Pillow parses every chunk before the image data in Python when it opens a PNG (about 5 µs each:
# a million empty chunks, 12 MB, cost 5 s) and walks the rest when it verifies or decodes one.
# Real files have a handful before the data; libpng writes its data in 8 KiB chunks, so a 200 MiB
# PNG has about 25,600 in all.
_PNG_MAX_CHUNKS_BEFORE_DATA = 1_000
_PNG_MAX_CHUNKS = 100_000
# The same for a JPEG's segments (and fill bytes) before its image data, which Pillow reads one by
# one in Python too: a million empty comments, 4 MB, took 1.4 s. Real files have a few dozen.
_JPEG_MAX_MARKERS_BEFORE_SCAN = 1_000
_JPEG_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xD9)})  # TEM, RST0-7, SOI: no length
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
# MuPDF's context). A render process has one thread, but callers in the same process (tools, tests)
# may use several, so every MuPDF call takes this lock.
_MUPDF_LOCK = threading.Lock()
# ``warnings.catch_warnings`` swaps the process-wide filter list; two threads interleaving it can
# leave one's filter installed for good, so our own uses take turns.
_WARNINGS_LOCK = threading.Lock()


def inspect_document(
    path: Path, kind: DocumentKind, spec: str | None, *, max_pages: int, max_pixels: int
) -> Inspection:
    """The submit-time check: open the document, count its pages and select them by ``spec``.

    Every selected PDF page is loaded (not rendered), so a page tree that claims more pages than
    it holds is refused now rather than failing the task later. Raises what ``count_pages`` and
    ``select_pages`` raise; a PDF page that cannot be loaded is an ``InvalidDocument`` naming it.
    """
    if kind is not DocumentKind.PDF:
        page_count = count_pages(path, kind, max_pixels=max_pixels, max_pages=max_pages)
        return Inspection(page_count, select_pages(spec, page_count, max_pages=max_pages))
    with _PdfDocument(path) as document:
        numbers = select_pages(spec, document.page_count, max_pages=max_pages)
        for number in numbers:
            document.check_loads(number)
        return Inspection(document.page_count, numbers)


def count_pages(
    path: Path, kind: DocumentKind, *, max_pixels: int | None = None, max_pages: int | None = None
) -> int:
    """Open the document and return its page count (frames for a multi-frame TIFF; 1 for other images).

    Raises ``InvalidDocument`` for a corrupt or truncated file, a PDF that needs a password, a PDF
    with no pages or a damaged page tree, a PNG or JPEG padded with chunks or markers, or an image
    whose declared size is a decompression bomb: over Pillow's own limit, or over
    ``4 * max_pixels`` when ``max_pixels`` is given. No pixels are decoded. TIFF frames are
    counted up to ``max_pages + 1`` only: past ``max_pages`` of them it raises ``TooManyPages``
    (whatever the selection, as the count is unknown).
    """
    if kind is DocumentKind.PDF:
        with _PdfDocument(path) as document:
            return document.page_count
    limit = _declared_limit(max_pixels)
    with _open_image(path, kind) as image:
        try:
            count = _count_frames(image, kind, sys.maxsize if max_pages is None else max_pages + 1)
            if max_pages is not None and count > max_pages:
                raise TooManyPages(
                    f"the {kind.value.upper()} has more than {max_pages} pages (frames); the limit is "
                    f"{max_pages} (APP_MAX_PAGES)"
                )
            for number in range(1, count + 1):
                image.seek(number - 1)
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

    See ``Document.render`` for what each page becomes and what it raises.
    """
    with open_document(path, kind) as document:
        for number in numbers:
            yield document.render(number, dpi=dpi, max_pixels=max_pixels)


class Document(ABC):
    """An open document whose pages render one at a time, in any order; ``close`` it when done.

    Not for use by several threads at once.
    """

    @abstractmethod
    def render(self, number: int, *, dpi: float, max_pixels: int) -> PageImage:
        """Render 1-based page ``number`` as an RGB image.

        PDF pages are rendered at ``dpi``, or lower where that would pass ``max_pixels`` (the dpi
        used is reported). Images are made RGB (transparency onto white), turned upright by their
        EXIF orientation and scaled down to ``max_pixels``. Raises ``InvalidDocument`` naming the
        page when it cannot be rendered, ``RenderMemoryExceeded`` naming it when memory runs out,
        and ``InvalidOptions`` for a page number past the end.
        """

    @abstractmethod
    def close(self) -> None:
        """Release the file and the library's hold on it."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def open_document(path: Path, kind: DocumentKind) -> Document:
    """Open a document for rendering. Raises ``InvalidDocument`` as ``count_pages`` does."""
    if kind is DocumentKind.PDF:
        return _PdfDocument(path)
    return _ImageDocument(path, kind)


def _check_in_range(number: int, page_count: int) -> None:
    if not 1 <= number <= page_count:
        raise InvalidOptions(out_of_range(number, page_count))


def _out_of_memory(page: str) -> RenderMemoryExceeded:
    return RenderMemoryExceeded(f"{page} needs more memory than a render process may use")


# --- PDF ------------------------------------------------------------------------------------------


class _PdfDocument(Document):
    """A PDF that can be rendered: not encrypted, with at least one page."""

    def __init__(self, path: Path) -> None:
        with _MUPDF_LOCK:
            try:
                self._document = pymupdf.open(path, filetype="pdf")
            except _PDF_ERRORS as exc:
                # MuPDF's message names our storage path; say what went wrong instead.
                raise InvalidDocument("the PDF cannot be opened: it is damaged or not a PDF") from exc
        try:
            with _MUPDF_LOCK:
                needs_password = self._document.needs_pass
                try:
                    self.page_count: int = self._document.page_count
                except _PDF_ERRORS as exc:  # a /Count that is not a number of pages MuPDF can use
                    raise InvalidDocument(
                        "the PDF's page tree is damaged: it does not say how many pages it has"
                    ) from exc
            if needs_password:
                raise InvalidDocument("the PDF is encrypted and needs a password")
            if self.page_count == 0:
                raise InvalidDocument("the PDF has no pages")
        except BaseException:
            self.close()
            raise

    def check_loads(self, number: int) -> None:
        """Load page ``number`` (its dictionary, not its content) or raise ``InvalidDocument``."""
        _check_in_range(number, self.page_count)
        try:
            with _MUPDF_LOCK:
                self._document.load_page(number - 1)
        except _PDF_ERRORS as exc:
            raise InvalidDocument(
                f"page {number} cannot be read: the PDF says it has {self.page_count} pages, but its "
                "page tree is damaged"
            ) from exc

    def render(self, number: int, *, dpi: float, max_pixels: int) -> PageImage:
        _check_in_range(number, self.page_count)
        try:
            with _MUPDF_LOCK:
                image, zoom, text = _render_pdf_page(self._document, number, dpi / 72, max_pixels)
        except MemoryError as exc:
            raise _out_of_memory(f"page {number}") from exc
        except _PDF_ERRORS as exc:
            # MuPDF reports a failed allocation (the render process's memory ceiling) as a system
            # error, "malloc (N bytes) failed".
            if isinstance(exc, pymupdf.mupdf.FzErrorSystem) and "alloc" in str(exc):
                raise _out_of_memory(f"page {number}") from exc
            raise InvalidDocument(f"page {number} cannot be rendered: {exc}") from exc
        return PageImage(number=number, image=image, dpi=zoom * 72, text_layer=text, has_ink=has_ink(image))

    def close(self) -> None:
        with _MUPDF_LOCK:
            self._document.close()


def _render_pdf_page(
    document: pymupdf.Document, number: int, zoom: float, max_pixels: int
) -> tuple[Image.Image, float, str | None]:
    """Render one page and extract its text layer (``PageImage.text_layer``); MuPDF's page and
    pixmap are freed on return, so never held across a yield."""
    page = document.load_page(number - 1)
    zoom = _fit_zoom(page.rect.width, page.rect.height, zoom, max_pixels)
    pixmap = page.get_pixmap(matrix=pymupdf.Matrix(zoom, zoom), colorspace=pymupdf.csRGB, alpha=False)
    image = Image.frombytes("RGB", (pixmap.width, pixmap.height), pixmap.samples_mv)
    del pixmap  # its megabytes go back before the text is extracted
    return image, zoom, _text_layer(page)


def _text_layer(page: pymupdf.Page) -> str | None:
    """The page's text as MuPDF reads it (text outside the page left out, invisible text such as a
    scan's OCR layer kept, words split at a line's end hyphen joined), at most
    ``TEXT_LAYER_MAX_CHARS``; ``None`` when it has none, or when it cannot be extracted: the text
    layer only measures the page's quality, so a page that rendered is not lost to it (it goes
    without an agreement).

    Costs 1-2 ms on a dense page, against 8-12 ms for its render and encoding. MuPDF holds the whole
    page's text while extracting (about 50 bytes a character): a page with millions of characters
    is bounded by the render process's memory ceiling and deadline like its render, and only the
    cap is kept. Built from MuPDF's own objects rather than with ``Page.get_text``, which keeps its
    half-built text when MuPDF runs out of memory (430 MB of a 512 MiB ceiling still held after
    the failure, measured on a page of 10.8 million characters), so nothing is left to encode the
    page with; these are freed with the exception.
    """
    mupdf = pymupdf.mupdf
    fz_page = page.this if isinstance(page.this, mupdf.FzPage) else page.this.super()
    try:
        stext = mupdf.FzStextPage(mupdf.fz_bound_page(fz_page))
        device = mupdf.fz_new_stext_device(stext, mupdf.FzStextOptions(_TEXT_FLAGS))
        mupdf.fz_run_page(fz_page, device, mupdf.FzMatrix(), mupdf.FzCookie())
        mupdf.fz_close_device(device)
        utf8 = mupdf.fz_new_buffer_from_stext_page(stext).fz_buffer_extract()
    except (MemoryError, *_PDF_ERRORS):
        return None
    # A crafted font may map glyphs to what is not Unicode; "replace" keeps it harmless.
    text = utf8.decode("utf-8", "replace")[:TEXT_LAYER_MAX_CHARS]
    return text if text.strip() else None


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
    if kind is DocumentKind.PNG:
        _check_png_chunks(path)
    elif kind is DocumentKind.JPEG:
        _check_jpeg_markers(path)
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


def _check_png_chunks(path: Path) -> None:
    """Walk the PNG's chunk headers (seeking over their data) and refuse a file padded with chunks.

    Truncation and bad CRCs are left to Pillow, which reports them in its own words.
    """
    with path.open("rb") as file:
        file.seek(8)  # the signature, checked by sniff and again by Pillow
        before_data = True
        for seen in range(1, _PNG_MAX_CHUNKS + 1):
            head = file.read(8)
            if len(head) < 8:
                return
            length, tag = struct.unpack(">I4s", head)
            if tag == b"IEND":
                return
            before_data = before_data and tag != b"IDAT"
            if before_data and seen > _PNG_MAX_CHUNKS_BEFORE_DATA:
                raise InvalidDocument(
                    f"the PNG has more than {_PNG_MAX_CHUNKS_BEFORE_DATA} chunks before its image data "
                    "(padding?)"
                )
            file.seek(length + 4, os.SEEK_CUR)  # the data and its CRC
    raise InvalidDocument(f"the PNG has more than {_PNG_MAX_CHUNKS} chunks (padding?)")


def _check_jpeg_markers(path: Path) -> None:
    """Walk the JPEG's markers up to its first scan and refuse a file padded with them.

    Anything that is not a marker where one belongs is left to Pillow, which reports it.
    """
    with path.open("rb") as file:
        file.seek(2)  # the start-of-image marker, checked by sniff
        for _ in range(_JPEG_MAX_MARKERS_BEFORE_SCAN):
            head = file.read(2)
            if len(head) < 2 or head[0] != 0xFF or head[1] == 0xDA:  # damage, or the first scan
                return
            if head[1] == 0xFF:  # a fill byte: the marker starts one byte on
                file.seek(-1, os.SEEK_CUR)
            elif head[1] not in _JPEG_STANDALONE_MARKERS:
                size = int.from_bytes(file.read(2), "big")  # the segment's, its own two bytes included
                if size < 2:
                    return
                file.seek(size - 2, os.SEEK_CUR)
    raise InvalidDocument(
        f"the JPEG has more than {_JPEG_MAX_MARKERS_BEFORE_SCAN} markers before its image data (padding?)"
    )


def _count_frames(image: Image.Image, kind: DocumentKind, limit: int) -> int:
    """The image's pages, counted up to ``limit``, by seeking one frame after another.

    Only TIFF frames are pages; the extra frames of an animated PNG or WebP, or a JPEG's MPF
    previews, are not. Pillow's ``n_frames`` would walk every frame of a TIFF, at a cost that grows
    with the square of their number (40,000 frames in 4 MB took 16 s).
    """
    if kind is not DocumentKind.TIFF:
        return 1
    for index in range(limit):
        try:
            image.seek(index)
        except EOFError:
            return index
    return limit


def _check_declared_size(image: Image.Image, number: int, limit: int | None) -> None:
    """Refuse page ``number`` (the current frame) if its declared size is over ``limit`` pixels."""
    width, height = image.size
    if limit is not None and width * height > limit:
        raise InvalidDocument(
            f"page {number} is {width}x{height} pixels, over the limit of {limit} pixels "
            "(a decompression bomb?)"
        )


class _ImageDocument(Document):
    """An image file; a TIFF has a page per frame, any other image one page."""

    def __init__(self, path: Path, kind: DocumentKind) -> None:
        self._kind = kind
        self._closing = ExitStack()
        self._image = self._closing.enter_context(_open_image(path, kind))

    def render(self, number: int, *, dpi: float, max_pixels: int) -> PageImage:
        try:
            self._seek(number)
            _check_declared_size(self._image, number, _declared_limit(max_pixels))
            page = _decode_frame(self._image, max_pixels)
        except MemoryError as exc:
            raise _out_of_memory(f"page {number}") from exc
        except _IMAGE_ERRORS as exc:
            raise InvalidDocument(f"page {number} cannot be decoded: {exc}") from exc
        return PageImage(number=number, image=page, dpi=None, has_ink=has_ink(page))

    def _seek(self, number: int) -> None:
        """Make page ``number`` the current frame; ``InvalidOptions`` when the image has fewer."""
        if number >= 1 and (number == 1 or self._kind is DocumentKind.TIFF):
            try:
                self._image.seek(number - 1)
                return
            except EOFError:
                pass
        raise InvalidOptions(out_of_range(number, _count_frames(self._image, self._kind, number)))

    def close(self) -> None:
        self._closing.close()


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
