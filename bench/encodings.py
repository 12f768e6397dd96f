"""The lossless encoding a rendered page travels in (``app.lossless``), against the alternatives.

Each page of a real PDF is rendered once at 144 dpi with PyMuPDF; then, for each encoding, every
page is encoded, and decoded to RGB as an engine does (vLLM opens the bytes with Pillow and
converts to RGB), in this process, one page at a time, CPU time. The table gives each per page,
the bytes, and the ratios to Pillow's PNG at zlib level 1 (what a client around the model
would send), and checks every round trip is exact::

    python -m bench.encodings --pdf x/usr/share/doc/octave/octave.pdf --pages 40
"""

from __future__ import annotations

import argparse
import io
import time
from collections.abc import Callable
from pathlib import Path

import pymupdf
from PIL import Image

from app import lossless

DPI = 144


def _pillow(format: str, **options: object) -> Callable[[Image.Image], bytes]:
    def encode(image: Image.Image) -> bytes:
        out = io.BytesIO()
        image.save(out, format=format, **options)
        return out.getvalue()

    return encode


ENCODINGS: list[tuple[str, Callable[[Image.Image], bytes]]] = [
    ("Pillow PNG, zlib level 1 (baseline)", _pillow("PNG", compress_level=1)),
    ("Pillow PNG, zlib level 6 (Pillow's default)", _pillow("PNG")),
    ("Pillow TIFF PackBits", _pillow("TIFF", compression="packbits")),
    ("Pillow TIFF LZW", _pillow("TIFF", compression="tiff_lzw")),
    ("Pillow WebP lossless, method 0", _pillow("WEBP", lossless=True, method=0, quality=0)),
    ("app.lossless.encode (TIFF PackBits, one channel when grey)", lossless.encode),
]


def _rgb(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pdf", type=Path, required=True, help="a real multi-page PDF")
    parser.add_argument("--pages", type=int, default=40, help="pages, spread evenly over the PDF")
    args = parser.parse_args()

    document = pymupdf.open(args.pdf)
    step = max(1, document.page_count // args.pages)
    pages = []
    for number in range(0, document.page_count, step)[: args.pages]:
        pixmap = document.load_page(number).get_pixmap(dpi=DPI)
        pages.append(Image.frombytes("RGB", (pixmap.width, pixmap.height), pixmap.samples))
    width, height = pages[0].size
    print(f"{len(pages)} pages of {args.pdf.name} at {DPI} dpi ({width}x{height} for the first)")
    print(
        "| encoding | encode a page | decode to RGB | KiB a page | encode x baseline "
        "| bytes x baseline | exact |"
    )
    print("|---|---:|---:|---:|---:|---:|---|")
    baseline: tuple[float, float] | None = None
    for name, encode in ENCODINGS:
        started = time.process_time()
        blobs = [encode(page) for page in pages]
        encode_ms = 1000 * (time.process_time() - started) / len(pages)
        started = time.process_time()
        decoded = [_rgb(blob) for blob in blobs]
        decode_ms = 1000 * (time.process_time() - started) / len(pages)
        size = sum(map(len, blobs)) / len(blobs)
        exact = all(a.tobytes() == b.tobytes() for a, b in zip(pages, decoded, strict=True))
        baseline = baseline or (encode_ms, size)
        print(
            f"| {name} | {encode_ms:.1f} ms | {decode_ms:.1f} ms | {size / 1024:.0f} | "
            f"{encode_ms / baseline[0]:.2f} | {size / baseline[1]:.2f} | {'yes' if exact else 'NO'} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
