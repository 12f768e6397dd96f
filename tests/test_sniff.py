"""The document kind comes from the bytes alone."""

from __future__ import annotations

import io

import pymupdf
import pytest
from PIL import Image

from app.documents import DocumentKind
from app.pipeline.sniff import SNIFF_BYTES, sniff


def _image_bytes(format_: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), "red").save(buffer, format=format_)
    return buffer.getvalue()


def _pdf_bytes() -> bytes:
    with pymupdf.open() as document:
        document.new_page()
        return document.tobytes()


@pytest.mark.parametrize(
    ("format_", "kind"),
    [
        ("PNG", DocumentKind.PNG),
        ("JPEG", DocumentKind.JPEG),
        ("WEBP", DocumentKind.WEBP),
        ("TIFF", DocumentKind.TIFF),
        ("BMP", DocumentKind.BMP),
    ],
)
def test_sniff_recognises_images_written_by_pillow(format_: str, kind: DocumentKind) -> None:
    assert sniff(_image_bytes(format_)[:SNIFF_BYTES]) is kind


def test_sniff_recognises_a_pdf_written_by_pymupdf() -> None:
    assert sniff(_pdf_bytes()[:SNIFF_BYTES]) is DocumentKind.PDF


def test_sniff_finds_a_pdf_header_after_leading_junk_within_the_window() -> None:
    assert sniff(b"\xef\xbb\xbf" + b"x" * 500 + b"%PDF-1.7\n") is DocumentKind.PDF
    assert sniff(b"x" * SNIFF_BYTES + b"%PDF-1.7\n") is None


@pytest.mark.parametrize(
    "head",
    [
        b"MM\x00*\x00\x00\x00\x08",  # big-endian TIFF
        b"II+\x00\x08\x00\x00\x00",  # BigTIFF
    ],
)
def test_sniff_recognises_other_tiff_byte_orders(head: bytes) -> None:
    assert sniff(head) is DocumentKind.TIFF


@pytest.mark.parametrize(
    "head",
    [
        b"",
        b"hello, world",
        b"<!DOCTYPE html><html><body>hello</body></html>",
        b"BMW owners manual, chapter one: the engine",  # starts with "BM" but is text
        b"RIFF\x00\x00\x00\x00WAVEfmt ",  # RIFF, but audio
        b"GIF89a\x01\x00\x01\x00",
        b"\x89PN",  # a cut signature
    ],
)
def test_sniff_refuses_what_it_does_not_support(head: bytes) -> None:
    assert sniff(head) is None


@pytest.mark.parametrize(
    ("kind", "content_type", "extension"),
    [
        (DocumentKind.PDF, "application/pdf", ".pdf"),
        (DocumentKind.PNG, "image/png", ".png"),
        (DocumentKind.JPEG, "image/jpeg", ".jpg"),
        (DocumentKind.WEBP, "image/webp", ".webp"),
        (DocumentKind.TIFF, "image/tiff", ".tiff"),
        (DocumentKind.BMP, "image/bmp", ".bmp"),
    ],
)
def test_kind_names_its_media_type_and_extension(
    kind: DocumentKind, content_type: str, extension: str
) -> None:
    assert kind.content_type == content_type
    assert kind.extension == extension
    assert DocumentKind(kind.value) is kind  # stored as its value, read back the same
