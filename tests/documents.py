"""Documents made by the tests: PDFs with text pages and a picture, images in every format."""

from __future__ import annotations

import io
import struct
import zlib

import pymupdf
from PIL import Image

# Where the picture sits on the picture page, in PDF points of an A4 page (595 x 842).
PICTURE_RECT = (100.0, 200.0, 400.0, 500.0)


def png_bytes(size: tuple[int, int] = (300, 300), color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def make_pdf(pages: int = 3, *, picture_page: int | None = 3) -> bytes:
    """A4 pages with a heading and a paragraph each; ``picture_page`` also holds a red picture."""
    doc = pymupdf.open()
    for number in range(1, pages + 1):
        page = doc.new_page(width=595, height=842)
        page.insert_text((72, 72), f"Page {number} heading", fontsize=20)
        page.insert_text((72, 110), f"Body text of page {number}.", fontsize=11)
        if number == picture_page:
            page.insert_image(pymupdf.Rect(*PICTURE_RECT), stream=png_bytes())
    data = doc.tobytes()
    doc.close()
    return data


def norm_box(
    rect: tuple[float, float, float, float], page_size: tuple[float, float] = (595, 842)
) -> list[int]:
    """A rectangle in points as the model would give it: 0-999 of the page's width and height."""
    width, height = page_size
    x0, y0, x1, y1 = rect
    return [
        round(x0 / width * 999),
        round(y0 / height * 999),
        round(x1 / width * 999),
        round(y1 / height * 999),
    ]


def png_declaring(width: int, height: int) -> bytes:
    """A valid PNG header declaring a huge size, followed by a few bytes of pixel data (a bomb)."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def huge_page_pdf(side_points: float = 14400) -> bytes:
    """One page of ``side_points`` square (200 inches): 800 megapixels at 144 dpi if rendered naively."""
    doc = pymupdf.open()
    page = doc.new_page(width=side_points, height=side_points)
    page.insert_text((72, 72), "A very large page", fontsize=200)
    data = doc.tobytes()
    doc.close()
    return data


# Pages with a text layer the service compares the model's text with (issue 17), and answers
# the tiny model is scripted to give for them.
READ_WELL = (
    "Every page of this report is read by the service and checked word by word against the text "
    "layer that the authoring tool wrote into the file when the report was made"
)
READ_BADLY = (
    "A second paragraph speaks of harbours and lighthouses along a northern coast where ships wait "
    "for the tide before they sail into the narrow channel at dawn"
)
ANSWER_WELL = f"<|ref|>text<|/ref|><|det|>[[80, 80, 900, 200]]<|/det|>\n{READ_WELL}"
# More tokens than the token cap the tests give the server (300): the page never reaches its end
# marker (so it is suspect), and none of its words are on the page either.
RUNAWAY = "<|ref|>text<|/ref|><|det|>[[50, 50, 950, 950]]<|/det|>\nWords without end: " + " ".join(
    f"w{n}" for n in range(300)
)


def text_pdf(*paragraphs: str) -> bytes:
    """A4 pages, one paragraph each, as a text layer the server can compare the model's text with."""
    doc = pymupdf.open()
    for paragraph in paragraphs:
        page = doc.new_page(width=595, height=842)
        page.insert_textbox(pymupdf.Rect(72, 72, 523, 400), paragraph, fontsize=11)
    data = doc.tobytes()
    doc.close()
    return data
