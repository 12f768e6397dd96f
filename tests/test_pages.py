"""Page selection, page counting and rendering of real PDFs and images made here."""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pymupdf
import pytest
from PIL import Image

from app.documents import DocumentKind, select_pages, validate_page_spec
from app.errors import InvalidDocument, InvalidOptions, TooManyPages
from app.pipeline.pages import (
    Inspection,
    PageImage,
    count_pages,
    inspect_document,
    open_document,
    render_pages,
)
from tests.documents import png_declaring
from tests.test_hostile_documents import (
    chunk_padded_png,
    lying_count_pdf,
    many_frame_tiff,
    marker_padded_jpeg,
)

MAX_PIXELS = 40_000_000  # the service's default APP_MAX_PAGE_PIXELS


def _render(path: Path, kind: DocumentKind, numbers: list[int], **kwargs: float) -> list[PageImage]:
    options = {"dpi": 144.0, "max_pixels": MAX_PIXELS} | kwargs
    return list(render_pages(path, kind, numbers, dpi=options["dpi"], max_pixels=int(options["max_pixels"])))


@pytest.fixture
def make_pdf(tmp_path: Path) -> Callable[..., Path]:
    """Write a PDF of ``pages`` pages of ``size`` points, each with its number as text."""

    def make(
        pages: int = 3, size: tuple[float, float] = (612, 792), name: str = "doc.pdf", **save: object
    ) -> Path:
        path = tmp_path / name
        with pymupdf.open() as document:
            for number in range(1, pages + 1):
                page = document.new_page(width=size[0], height=size[1])
                page.insert_text((72, 72), f"Page {number}", fontsize=24)
            document.save(path, **save)
        return path

    return make


def _save(image: Image.Image, path: Path, **params: Any) -> Path:
    image.save(path, **params)
    return path


# --- page selection -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "page_count", "expected"),
    [
        ("1-3,7", 10, [1, 2, 3, 7]),
        ("5-", 7, [5, 6, 7]),
        (None, 3, [1, 2, 3]),
        ("", 2, [1, 2]),
        ("  ", 2, [1, 2]),
        (" 3 , 1 - 2 ,2", 5, [1, 2, 3]),
        ("4-4", 4, [4]),
        ("2,1,2", 2, [1, 2]),
    ],
)
def test_select_pages_returns_sorted_unique_page_numbers(
    spec: str | None, page_count: int, expected: list[int]
) -> None:
    assert select_pages(spec, page_count) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("0", "numbered from 1"),
        ("0-2", "numbered from 1"),
        ("3-1", "the range 3-1 is reversed"),
        ("a", "'a' is not a page or a range"),
        ("1,,2", "is not a page or a range"),
        ("1-2-3", "is not a page or a range"),
        ("-3", "is not a page or a range"),
        ("1.5", "is not a page or a range"),
        ("1;2", "is not a page or a range"),
        ("1," * 600, "longer than"),
    ],
)
def test_bad_page_specs_are_refused_with_a_clear_message(spec: str, message: str) -> None:
    with pytest.raises(InvalidOptions, match=message):
        validate_page_spec(spec)
    with pytest.raises(InvalidOptions, match=message):
        select_pages(spec, 100)


def test_pages_past_the_end_are_refused_naming_the_page() -> None:
    with pytest.raises(InvalidOptions) as caught:
        select_pages("1-3,9", 5)
    assert caught.value.message == "page 9 is out of range: the document has 5 pages"
    with pytest.raises(InvalidOptions, match=r"page 7 is out of range: the document has 1 page$"):
        select_pages("7-", 1)
    with pytest.raises(InvalidOptions, match="page 8 is out of range"):
        select_pages("2-8", 5)


@pytest.mark.parametrize(
    ("spec", "page_count", "selected"),
    [
        (None, 2**31 - 1, 2**31 - 1),  # what a lying /Count may claim: refused before any list exists
        ("1-3,2-600", 1000, 600),
        ("1-3,2-4,10,4", 10, 5),
        ("7-,1", 10**9, 10**9 - 5),
    ],
)
def test_a_selection_past_the_page_limit_is_refused_before_it_is_built(
    spec: str | None, page_count: int, selected: int
) -> None:
    started = time.perf_counter()
    with pytest.raises(TooManyPages) as caught:
        select_pages(spec, page_count, max_pages=4)
    assert caught.value.message.startswith(f"{selected} pages selected; the limit is 4 (APP_MAX_PAGES)")
    assert time.perf_counter() - started < 0.1


def test_a_selection_at_the_page_limit_is_kept() -> None:
    assert select_pages("1-3,2-4,10", 10, max_pages=5) == [1, 2, 3, 4, 10]
    assert select_pages(None, 3, max_pages=3) == [1, 2, 3]


def test_validate_page_spec_checks_syntax_only() -> None:
    validate_page_spec("1-3,7,10-")
    validate_page_spec("900")  # the page count is not known yet


# --- PDFs -----------------------------------------------------------------------------------------


def test_count_pages_of_a_pdf(make_pdf: Callable[..., Path]) -> None:
    assert count_pages(make_pdf(pages=4), DocumentKind.PDF) == 4


@pytest.mark.parametrize(("dpi", "size"), [(72, (612, 792)), (144, (1224, 1584))])
def test_pdf_pages_render_at_the_requested_dpi(
    make_pdf: Callable[..., Path], dpi: float, size: tuple[int, int]
) -> None:
    pages = _render(make_pdf(pages=3), DocumentKind.PDF, [1, 3], dpi=dpi)
    assert [page.number for page in pages] == [1, 3]
    for page in pages:
        assert page.image.mode == "RGB"
        assert page.image.size == size
        assert page.dpi == dpi
        # Black text was drawn on a white page: both must show.
        assert page.image.getextrema() == ((0, 255), (0, 255), (0, 255))


def test_a_huge_pdf_page_is_scaled_to_the_pixel_limit(make_pdf: Callable[..., Path]) -> None:
    path = make_pdf(pages=1, size=(14400, 14400))  # 200 x 200 inches: 829 Mpx at 144 dpi
    (page,) = _render(path, DocumentKind.PDF, [1], dpi=144)
    width, height = page.image.size
    assert width * height <= MAX_PIXELS
    assert width * height > 0.99 * MAX_PIXELS  # scaled to fit, not to a token size
    assert page.dpi is not None
    assert page.dpi < 144
    assert width == pytest.approx(14400 * page.dpi / 72, abs=1)


def test_odd_page_sizes_stay_within_a_small_pixel_limit(make_pdf: Callable[..., Path]) -> None:
    path = make_pdf(pages=1, size=(612.3, 791.7))
    (page,) = _render(path, DocumentKind.PDF, [1], dpi=300, max_pixels=100_003)
    assert page.image.width * page.image.height <= 100_003


def test_pdf_pages_are_rendered_only_as_they_are_pulled(make_pdf: Callable[..., Path]) -> None:
    pages = render_pages(make_pdf(pages=2), DocumentKind.PDF, [2, 5], dpi=72, max_pixels=MAX_PIXELS)
    assert next(pages).number == 2  # page 5 does not exist, and nothing has looked at it yet
    with pytest.raises(InvalidOptions, match="page 5 is out of range: the document has 2 pages"):
        next(pages)


def test_a_corrupt_pdf_is_an_invalid_document(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.pdf"
    path.write_bytes(b"%PDF-1.7\nthis is not a PDF at all\n")
    with pytest.raises(InvalidDocument, match="cannot be opened") as caught:
        count_pages(path, DocumentKind.PDF)
    assert str(tmp_path) not in caught.value.message  # no server paths in a user's error


def test_an_encrypted_pdf_is_an_invalid_document(make_pdf: Callable[..., Path]) -> None:
    path = make_pdf(encryption=pymupdf.mupdf.PDF_ENCRYPT_AES_256, user_pw="secret", owner_pw="owner")
    with pytest.raises(InvalidDocument, match="encrypted and needs a password"):
        count_pages(path, DocumentKind.PDF)
    with pytest.raises(InvalidDocument, match="encrypted"):
        _render(path, DocumentKind.PDF, [1])


def test_a_pdf_with_only_an_owner_password_opens(make_pdf: Callable[..., Path]) -> None:
    path = make_pdf(pages=2, encryption=pymupdf.mupdf.PDF_ENCRYPT_AES_256, owner_pw="owner", user_pw="")
    assert count_pages(path, DocumentKind.PDF) == 2


def test_a_pdf_without_pages_is_an_invalid_document(tmp_path: Path) -> None:
    path = tmp_path / "empty.pdf"
    path.write_bytes(
        b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n"
        b"2 0 obj<</Type/Pages/Kids[]/Count 0>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n"
    )
    with pytest.raises(InvalidDocument, match="no pages"):
        count_pages(path, DocumentKind.PDF)


def test_inspect_document_selects_pages_and_loads_each_one(make_pdf: Callable[..., Path]) -> None:
    path = make_pdf(pages=4)
    assert inspect_document(path, DocumentKind.PDF, "2-3", max_pages=10, max_pixels=MAX_PIXELS) == (
        Inspection(page_count=4, numbers=[2, 3])
    )
    with pytest.raises(TooManyPages, match="4 pages selected; the limit is 3"):
        inspect_document(path, DocumentKind.PDF, None, max_pages=3, max_pixels=MAX_PIXELS)


@pytest.mark.parametrize("count", [b"5", b"2147483647", b"-3", b"99999999999"])
def test_a_pdf_whose_page_count_is_unusable_is_an_invalid_document(tmp_path: Path, count: bytes) -> None:
    path = tmp_path / "lying.pdf"
    path.write_bytes(lying_count_pdf(count))
    with pytest.raises(InvalidDocument, match="the PDF's page tree is damaged"):
        count_pages(path, DocumentKind.PDF)
    with pytest.raises(InvalidDocument, match="the PDF's page tree is damaged"):
        _render(path, DocumentKind.PDF, [1])


def test_a_pdf_that_claims_a_page_it_lacks_is_refused_unless_that_page_is_left_out(tmp_path: Path) -> None:
    path = tmp_path / "lying.pdf"
    path.write_bytes(lying_count_pdf(b"1.5"))  # MuPDF reads two pages; there is one
    with pytest.raises(InvalidDocument) as caught:
        inspect_document(path, DocumentKind.PDF, None, max_pages=10, max_pixels=MAX_PIXELS)
    assert caught.value.message == (
        "page 2 cannot be read: the PDF says it has 2 pages, but its page tree is damaged"
    )
    assert inspect_document(path, DocumentKind.PDF, "1", max_pages=10, max_pixels=MAX_PIXELS) == (
        Inspection(page_count=2, numbers=[1])
    )


def test_pdf_pages_render_in_any_order_from_one_open_document(make_pdf: Callable[..., Path]) -> None:
    path = make_pdf(pages=3)
    alone = {page.number: page.image.tobytes() for page in _render(path, DocumentKind.PDF, [1, 3], dpi=72)}
    assert alone[1] != alone[3]  # each page shows its own number
    with open_document(path, DocumentKind.PDF) as document:
        for number in (3, 1, 3):
            assert document.render(number, dpi=72, max_pixels=MAX_PIXELS).image.tobytes() == alone[number]
        with pytest.raises(InvalidOptions, match="page 4 is out of range: the document has 3 pages"):
            document.render(4, dpi=72, max_pixels=MAX_PIXELS)


# --- images ---------------------------------------------------------------------------------------


def test_tiff_frames_are_counted_up_to_the_page_limit_only(tmp_path: Path) -> None:
    small = tmp_path / "three.tiff"
    small.write_bytes(many_frame_tiff(3))
    assert count_pages(small, DocumentKind.TIFF, max_pages=3) == 3
    with pytest.raises(TooManyPages, match="the TIFF has more than 2 pages"):
        count_pages(small, DocumentKind.TIFF, max_pages=2)

    large = tmp_path / "frames.tiff"
    large.write_bytes(many_frame_tiff(40_000))  # 5 MB; Pillow's n_frames took 16 s to count them
    started = time.perf_counter()
    with pytest.raises(
        TooManyPages, match=r"more than 500 pages \(frames\); the limit is 500 \(APP_MAX_PAGES\)"
    ):
        count_pages(large, DocumentKind.TIFF, max_pages=500)
    assert time.perf_counter() - started < 2


def test_a_tiff_page_past_the_last_frame_is_out_of_range(tmp_path: Path) -> None:
    path = tmp_path / "three.tiff"
    path.write_bytes(many_frame_tiff(3))
    with pytest.raises(InvalidOptions, match="page 5 is out of range: the document has 3 pages"):
        _render(path, DocumentKind.TIFF, [5])
    with pytest.raises(InvalidOptions, match=r"page 2 is out of range: the document has 1 page$"):
        _render(_save(Image.new("RGB", (8, 8)), tmp_path / "one.png"), DocumentKind.PNG, [2])


def test_a_png_padded_with_chunks_is_refused_before_pillow_parses_them(tmp_path: Path) -> None:
    path = tmp_path / "padded.png"
    path.write_bytes(chunk_padded_png(1_000_000))  # 12 MB; Pillow took 5 s to open it
    started = time.perf_counter()
    with pytest.raises(InvalidDocument, match="more than 1000 chunks before its image data"):
        count_pages(path, DocumentKind.PNG)
    with pytest.raises(InvalidDocument, match="more than 1000 chunks"):
        _render(path, DocumentKind.PNG, [1])
    assert time.perf_counter() - started < 1

    path.write_bytes(chunk_padded_png(900))
    assert count_pages(path, DocumentKind.PNG) == 1
    (page,) = _render(path, DocumentKind.PNG, [1])
    assert page.image.size == (10, 10)


def test_a_jpeg_padded_with_markers_is_refused_before_pillow_parses_them(tmp_path: Path) -> None:
    path = tmp_path / "padded.jpg"
    path.write_bytes(marker_padded_jpeg(1_000_000))  # 4 MB; Pillow took 1.4 s to open it
    started = time.perf_counter()
    with pytest.raises(InvalidDocument, match="more than 1000 markers before its image data"):
        count_pages(path, DocumentKind.JPEG)
    with pytest.raises(InvalidDocument, match="more than 1000 markers"):
        _render(path, DocumentKind.JPEG, [1])
    assert time.perf_counter() - started < 1

    path.write_bytes(marker_padded_jpeg(900))
    (page,) = _render(path, DocumentKind.JPEG, [1])
    assert page.image.size == (10, 10)


def test_a_multi_frame_tiff_has_a_page_per_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (50 + 10 * index, 40), (60 * index, 0, 0)) for index in range(3)]
    path = _save(frames[0], tmp_path / "scan.tiff", save_all=True, append_images=frames[1:])
    assert count_pages(path, DocumentKind.TIFF) == 3
    pages = _render(path, DocumentKind.TIFF, [1, 3])
    assert [(page.number, page.image.size, page.dpi) for page in pages] == [
        (1, (50, 40), None),
        (3, (70, 40), None),
    ]
    assert pages[1].image.getpixel((0, 0)) == (120, 0, 0)


def test_only_tiff_frames_are_pages(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (20, 20), colour) for colour in ("red", "blue")]
    path = _save(frames[0], tmp_path / "anim.webp", save_all=True, append_images=frames[1:])
    assert count_pages(path, DocumentKind.WEBP) == 1


def test_transparent_areas_of_an_rgba_png_become_white(tmp_path: Path) -> None:
    image = Image.new("RGBA", (40, 30), (255, 0, 0, 0))
    image.paste((0, 0, 255, 255), (0, 0, 10, 10))
    (page,) = _render(_save(image, tmp_path / "logo.png"), DocumentKind.PNG, [1])
    assert page.image.mode == "RGB"
    assert page.image.getpixel((1, 1)) == (0, 0, 255)
    assert page.image.getpixel((30, 20)) == (255, 255, 255)


@pytest.mark.parametrize(
    "image",
    [
        Image.new("LA", (20, 20), (0, 0)),
        Image.new("P", (20, 20), 0),
    ],
    ids=["grey-alpha", "palette-transparency"],
)
def test_other_transparent_modes_become_white(tmp_path: Path, image: Image.Image) -> None:
    path = _save(image, tmp_path / "t.png", **({"transparency": 0} if image.mode == "P" else {}))
    (page,) = _render(path, DocumentKind.PNG, [1])
    assert page.image.getpixel((5, 5)) == (255, 255, 255)


def test_a_cmyk_jpeg_becomes_rgb(tmp_path: Path) -> None:
    path = _save(Image.new("CMYK", (64, 48), (0, 255, 255, 0)), tmp_path / "print.jpg", quality=95)
    with Image.open(path) as original:
        assert original.mode == "CMYK"
    (page,) = _render(path, DocumentKind.JPEG, [1])
    assert page.image.mode == "RGB"
    red, green, blue = cast("tuple[int, int, int]", page.image.getpixel((32, 24)))
    assert red > 240
    assert max(green, blue) < 20


def test_a_16_bit_greyscale_png_keeps_its_contrast(tmp_path: Path) -> None:
    image = Image.new("I;16", (40, 30), 1000)
    image.paste(4000, (0, 0, 10, 10))  # a 12-bit scan: every value is "white" to a naive 8-bit cast
    (page,) = _render(_save(image, tmp_path / "scan16.png"), DocumentKind.PNG, [1])
    assert page.image.getpixel((1, 1)) == (255, 255, 255)
    assert page.image.getpixel((30, 20)) == (0, 0, 0)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    path = _save(Image.new("RGB", (60, 20), "white"), tmp_path / "photo.jpg", exif=exif)
    (page,) = _render(path, DocumentKind.JPEG, [1])
    assert page.image.size == (20, 60)


@pytest.mark.parametrize(("format_", "kind"), [("WEBP", DocumentKind.WEBP), ("BMP", DocumentKind.BMP)])
def test_webp_and_bmp_render(tmp_path: Path, format_: str, kind: DocumentKind) -> None:
    path = _save(Image.new("RGB", (30, 20), "red"), tmp_path / "image", format=format_)
    (page,) = _render(path, kind, [1])
    assert page.image.size == (30, 20)


def test_a_large_image_is_scaled_down_to_the_pixel_limit(tmp_path: Path) -> None:
    path = _save(Image.new("RGB", (3000, 2000), "white"), tmp_path / "big.jpg")
    (page,) = _render(path, DocumentKind.JPEG, [1], max_pixels=2_000_000)
    width, height = page.image.size
    assert width * height <= 2_000_000
    assert width * height > 0.99 * 2_000_000
    assert width / height == pytest.approx(1.5, rel=0.01)


def test_a_truncated_png_is_an_invalid_document(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    Image.effect_noise((200, 200), 50).convert("RGB").save(buffer, format="PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(InvalidDocument, match="cannot be read"):
        count_pages(path, DocumentKind.PNG)
    with pytest.raises(InvalidDocument, match="page 1 cannot be decoded"):
        _render(path, DocumentKind.PNG, [1])


def test_bytes_that_are_not_the_kind_claimed_are_an_invalid_document(tmp_path: Path) -> None:
    path = tmp_path / "fake.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"junk" * 10)
    with pytest.raises(InvalidDocument, match="cannot be read as PNG") as caught:
        count_pages(path, DocumentKind.PNG)
    assert str(tmp_path) not in caught.value.message


def test_an_image_declaring_a_huge_size_is_refused_before_decoding(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(png_declaring(100_000, 100_000))  # 10 Gpx, 30 GB once decoded
    started = time.perf_counter()
    with pytest.raises(InvalidDocument, match="too large"):
        count_pages(path, DocumentKind.PNG)
    with pytest.raises(InvalidDocument, match="too large"):
        _render(path, DocumentKind.PNG, [1])
    assert time.perf_counter() - started < 1


def test_an_image_past_four_times_the_pixel_limit_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    path.write_bytes(png_declaring(3000, 3000))
    with pytest.raises(InvalidDocument, match="page 1 is 3000x3000 pixels, over the limit of 4000000"):
        count_pages(path, DocumentKind.PNG, max_pixels=1_000_000)
    with pytest.raises(InvalidDocument, match="over the limit"):
        _render(path, DocumentKind.PNG, [1], max_pixels=1_000_000)


def test_every_tiff_frame_is_checked_for_its_declared_size(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (10, 10), "white"), Image.new("RGB", (300, 300), "white")]
    path = _save(frames[0], tmp_path / "mixed.tiff", save_all=True, append_images=frames[1:])
    with pytest.raises(InvalidDocument, match="page 2 is 300x300 pixels"):
        count_pages(path, DocumentKind.TIFF, max_pixels=10_000)
    pages = render_pages(path, DocumentKind.TIFF, [1, 2], dpi=144, max_pixels=10_000)
    assert next(pages).image.size == (10, 10)
    with pytest.raises(InvalidDocument, match="page 2"):
        next(pages)
