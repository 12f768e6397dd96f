"""Documents made by the tests: PDFs with text pages and a picture, images in every format."""

from __future__ import annotations

import io

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
