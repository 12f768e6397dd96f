"""The page's lossless encoding: exact round trips, and what a render process may not send."""

from __future__ import annotations

import io

import pytest
from PIL import Image, ImageDraw

from app import lossless


def _page(mode: str = "RGB") -> Image.Image:
    image = Image.new("RGB", (300, 200), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 10), "Annual Report", fill=(20, 20, 20))
    draw.rectangle((50, 80, 250, 150), fill=(90, 90, 90))
    if mode == "RGB":
        draw.line((0, 199, 299, 0), fill=(200, 30, 30), width=3)  # one coloured stroke
    return image


@pytest.mark.parametrize(("mode", "channels"), [("RGB", "RGB"), ("grey", "L")])
def test_every_pixel_reads_back_the_same_and_grey_pages_travel_in_one_channel(mode, channels) -> None:
    page = _page(mode)
    data = lossless.encode(page)

    assert lossless.declared_size(data, max_pixels=300 * 200) == (300, 200)
    decoded = lossless.decode(data)
    assert decoded.mode == channels
    assert decoded.convert("RGB").tobytes() == page.tobytes()
    # As vLLM reads it: Pillow opens the bytes, whatever the media type, and makes them RGB.
    with Image.open(io.BytesIO(data)) as opened:
        assert opened.format == "TIFF"
        assert opened.convert("RGB").tobytes() == page.tobytes()


def test_an_opened_page_carries_its_bytes_until_its_size_changes() -> None:
    data = lossless.encode(_page())
    image = lossless.opened(lossless.Encoded((300, 200), data))

    assert lossless.held(image) == data
    # A resized or cropped copy inherits ``info``, not the pixels: its bytes are not sent.
    assert lossless.held(image.resize((150, 100))) is None
    assert lossless.held(image.crop((0, 0, 10, 10))) is None
    assert lossless.held(Image.new("RGB", (300, 200))) is None


def _saved(image: Image.Image, format: str, **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format=format, **options)
    return out.getvalue()


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (_saved(_page(), "PNG"), "not a TIFF"),
        (b"II*\x00" + b"\x00" * 40, "not a TIFF"),
        (_saved(Image.new("RGBA", (30, 20)), "TIFF"), "mode RGBA"),
        (_saved(Image.new("I;16", (30, 20)), "TIFF"), "mode I;16"),
        (
            _saved(Image.new("L", (30, 20)), "TIFF", save_all=True, append_images=[Image.new("L", (30, 20))]),
            "2 frames",
        ),
        (_saved(Image.new("L", (400, 300)), "TIFF", compression="packbits"), "400x300"),
    ],
)
def test_what_is_not_an_encoded_page_within_the_pixel_limit_is_refused(data: bytes, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        lossless.declared_size(data, max_pixels=100_000)
