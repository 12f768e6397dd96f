"""Documents to page images: PDFs rendered with PyMuPDF, images decoded with Pillow."""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image


@dataclass
class PageImage:
    """One rendered page, ready for the engine."""

    number: int  # 1-based page number in the source document
    image: Image.Image  # RGB
    dpi: float | None  # render resolution for PDFs (after any pixel-limit scaling); None for images
