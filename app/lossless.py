"""The lossless encoding a rendered page travels in: render process -> service -> engine, and storage.

TIFF with PackBits, one channel for a page whose pixels are all grey. Chosen by measurement
(``bench/encodings.py``, 40 pages spread over a 1,158-page manual at 144 dpi, CPU a page): PNG at
zlib level 1 takes 34.4 ms to encode and 14.8 ms to decode to RGB (235 KiB), almost all of it
PNG's per-row filter choice; PNG at level 6 55.7 ms; lossless WebP (method 0) 41.0 ms; TIFF LZW
20.1 ms and 4.3 ms (246 KiB); TIFF PackBits 4.9 ms and 2.6 ms (324 KiB), and 6.5 ms and 3.6 ms
(290 KiB) with the grey pages in one channel. A page is encoded once and decoded by the engine and
again for crops, so this costs a fifth of PNG's CPU for 1.2 x its bytes (15 MB/s at 50 pages/s,
little next to a GPU node's network).

Every engine reads it: vLLM opens any image Pillow can (``vllm/multimodal/media/image.py``:
``ImageMediaIO.load_bytes`` is ``Image.open(BytesIO(data))`` whatever the data URL's media type,
then converts to RGB, so a one-channel page reads back with the same values), as do
``transformers serve`` (``transformers.image_utils.load_image``) and in-process engines.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, ImageChops

FORMAT = "TIFF"
MEDIA_TYPE = "image/tiff"
SUFFIX = ".tiff"

INFO_KEY = "dsocr_lossless"
"""An image opened from an encoded page carries ``Encoded`` under this key in ``info``, so an
engine that sends pages encoded sends those bytes as they are rather than encoding again."""


@dataclass(frozen=True)
class Encoded:
    """A page as ``encode`` made it, with the size it was checked to have (``declared_size``)."""

    size: tuple[int, int]  # a crop or a resized copy inherits ``info``, not the pixels: compare
    data: bytes


def encode(image: Image.Image) -> bytes:
    """``image`` (RGB or L) encoded losslessly: every pixel reads back the same (blocking, ~3 ms)."""
    out = io.BytesIO()
    _one_channel_if_grey(image).save(out, format=FORMAT, compression="packbits")
    return out.getvalue()


def declared_size(data: bytes, max_pixels: int) -> tuple[int, int]:
    """The size ``data`` declares, read from its header (nothing is decoded).

    Raises ``ValueError`` unless it is what ``encode`` makes: one image of one (L) or three (RGB)
    8-bit channels, at most ``max_pixels``. What another process sends is checked with this first.
    """
    try:
        with Image.open(io.BytesIO(data), formats=[FORMAT]) as image:
            width, height, mode = image.width, image.height, image.mode
            frames = getattr(image, "n_frames", 1)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"not a {FORMAT}: {exc}") from None
    if mode not in ("L", "RGB") or frames != 1 or not (0 < width * height <= max_pixels):
        raise ValueError(f"a {FORMAT} of {width}x{height} pixels in mode {mode}, {frames} frames")
    return width, height


def decode(data: bytes) -> Image.Image:
    """The pixels of ``encode``'s bytes, as encoded: L for a grey page, else RGB (blocking)."""
    # Not closed: closing an image frees its pixels, and a BytesIO holds no file.
    image = Image.open(io.BytesIO(data), formats=[FORMAT])
    image.load()
    return image if image.mode in ("L", "RGB") else image.convert("RGB")


def opened(encoded: Encoded) -> Image.Image:
    """``encoded`` opened, not decoded (its header only), carrying itself under ``INFO_KEY``."""
    image = Image.open(io.BytesIO(encoded.data), formats=[FORMAT])
    image.info[INFO_KEY] = encoded
    return image


def held(image: Image.Image) -> bytes | None:
    """The encoded bytes ``image`` carries (``opened``), if they are still of its pixels."""
    encoded = image.info.get(INFO_KEY)
    return encoded.data if isinstance(encoded, Encoded) and encoded.size == image.size else None


def _one_channel_if_grey(image: Image.Image) -> Image.Image:
    """``image`` as mode L when that loses nothing (R = G = B everywhere), else as it is (1.5 ms).

    Most text pages are grey: one channel costs a third of the time and bytes, and every reader
    makes it RGB again with the same values."""
    if image.mode != "RGB":
        return image
    red, green, blue = image.split()
    if ImageChops.difference(red, green).getbbox() or ImageChops.difference(green, blue).getbbox():
        return image
    return red
