"""Parsed pages to Markdown, layout and figure crops.

Pure: nothing here touches files. The caller writes ``crops`` under ``images/`` and the layout and
Markdown where ``DESIGN.md`` (section 4) says; figure links are relative (``images/<name>``) so
``full.md`` renders next to that folder.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from app.pipeline.grounding import Block, Box, ParsedPage
from app.pipeline.pages import PageImage

IMAGE_DIR = "images"

_HEADINGS = {"title": "# ", "sub_title": "## "}


@dataclass
class AssembledPage:
    """One page ready to store: its Markdown, its layout entry and the crops its links point at."""

    index: int  # 0-based position in the task's result
    number: int  # 1-based page number in the source document (PageImage.number)
    markdown: str  # this page's Markdown, figure links "images/<name>"
    layout: dict[str, Any]  # the page's entry in layout.json
    # (file name, the crop as PNG), one per image box kept: encoded as cut, so a page waiting for
    # its turn holds tens of kB a figure rather than its pixels
    crops: list[tuple[str, bytes]]
    truncated: bool
    truncated_reason: str | None
    # result.json's ``quality`` of the page (``PageQuality.as_json``); None where nothing judged it
    quality: dict[str, Any] | None = None

    @property
    def suspect(self) -> bool:
        """Whether the page's kept attempt is still suspect (``quality``)."""
        return self.quality is not None and bool(self.quality["suspect"])

    @property
    def retries(self) -> int:
        """The retry rungs the page climbed (its attempts after the first)."""
        return 0 if self.quality is None else int(self.quality["attempts"]) - 1


def assemble_page(
    page: PageImage, parsed: ParsedPage, index: int, *, quality: dict[str, Any] | None = None
) -> AssembledPage:
    """Build one page's Markdown, layout and crops from its parsed blocks, in reading order.

    Image blocks give one crop, Markdown link and layout block per box (crops named
    ``p{number:04d}_{n:02d}.png``, ``n`` from 1); a box empty in pixels gives no crop and no link but
    stays in the layout. Other blocks give one layout block whose ``bbox`` is the union of their boxes
    (each box also listed under ``boxes`` when there are several). Blocks without boxes have a null
    ``bbox``. Every block also has ``bbox_pt`` (and ``boxes_pt`` beside ``boxes``), the same box in
    PDF points (see ``to_points``). The truncation flags are carried as given; the usable content is
    kept either way. ``quality`` is carried as given.
    """
    size = page.size  # known without decoding: only pages with figures need their pixels
    parts: list[str] = []
    layout_blocks: list[dict[str, Any]] = []
    crops: list[tuple[str, bytes]] = []
    for block in parsed.blocks:
        if block.label == "image":
            entries, links, images = _image_block(block, page, first=len(crops) + 1)
            layout_blocks.extend(entries)
            parts.extend(links)
            crops.extend(images)
        else:
            layout_blocks.append(_region_entry(block, size))
            parts.append(block_markdown(block.label, block.content))
    for entry in layout_blocks:
        _add_points(entry, page.dpi)

    width, height = size
    layout = {
        "index": index,
        "page": page.number,
        "width": width,
        "height": height,
        "dpi": page.dpi,
        "truncated": not parsed.finished,
        "truncated_reason": parsed.truncated_reason,
        "blocks": layout_blocks,
    }
    return AssembledPage(
        index=index,
        number=page.number,
        markdown="\n\n".join(part for part in parts if part),
        layout=layout,
        crops=crops,
        truncated=not parsed.finished,
        truncated_reason=parsed.truncated_reason,
        quality=quality,
    )


def merge_markdown(pages: Sequence[AssembledPage]) -> str:
    """All pages' Markdown by ``index``, joined by a blank line, ending with exactly one newline.

    Pages without Markdown are skipped so they leave no run of blank lines.
    """
    texts = (page.markdown.strip() for page in sorted(pages, key=lambda page: page.index))
    return "\n\n".join(text for text in texts if text) + "\n"


def _image_block(
    block: Block, page: PageImage, first: int
) -> tuple[list[dict[str, Any]], list[str], list[tuple[str, bytes]]]:
    """An image block's layout blocks, Markdown parts and crops, its crops numbered from ``first``."""
    entries: list[dict[str, Any]] = []
    parts: list[str] = []
    crops: list[tuple[str, bytes]] = []
    for box in block.boxes:
        pixels = _to_pixels(box, page.size)
        entry = _box_entry("image", box, pixels)
        if _has_area(pixels):
            name = f"p{page.number:04d}_{first + len(crops):02d}.png"
            crops.append((name, _encode_crop(page.crop(pixels))))
            entry["image"] = f"{IMAGE_DIR}/{name}"
            parts.append(f"![]({entry['image']})")
        entries.append(entry)
    entries = entries or [{"type": "image", "bbox": None, "bbox_norm": None}]
    if block.content:
        # The content belongs to the block, not to each of its boxes: listed once.
        entries[0]["text"] = block.content
        parts.append(block.content)
    return entries, parts, crops


def _encode_crop(crop: Image.Image) -> bytes:
    """A figure crop as the PNG users download (zlib level 1: written once, read rarely; higher
    levels cost twice the time for a few per cent fewer bytes)."""
    out = io.BytesIO()
    crop.save(out, format="PNG", compress_level=1)
    return out.getvalue()


def block_markdown(label: str, text: str) -> str:
    """A non-image block's Markdown from its label and text: headings get their marker, everything
    else is kept verbatim (also how the console renders a block of layout.json, which keeps none)."""
    marker = _HEADINGS.get(label)
    if marker is None or not text or text.startswith("#"):
        return text
    # A Markdown heading is one line: a title the model wrapped is joined back up.
    return marker + " ".join(text.split())


def _region_entry(block: Block, size: tuple[int, int]) -> dict[str, Any]:
    """One layout block for a non-image block, its boxes merged into their union."""
    if not block.boxes:
        entry: dict[str, Any] = {"type": block.label, "bbox": None, "bbox_norm": None}
    else:
        union = (
            min(box[0] for box in block.boxes),
            min(box[1] for box in block.boxes),
            max(box[2] for box in block.boxes),
            max(box[3] for box in block.boxes),
        )
        entry = _box_entry(block.label, union, _to_pixels(union, size))
        if len(block.boxes) > 1:
            entry["boxes"] = [list(_to_pixels(box, size)) for box in block.boxes]
            entry["boxes_norm"] = [list(box) for box in block.boxes]
    entry["text"] = block.content
    return entry


def to_points(pixels: Sequence[int], dpi: float | None) -> list[float] | None:
    """A box in page pixels as PDF points, origin at the page's top left: ``px * 72 / dpi``.

    These are the coordinates of ``page.rect`` in PyMuPDF (the page as shown: its CropBox, with any
    /Rotate applied), which the pixmap the model saw covers from its top left corner; exact up to
    the outward rounding of the pixel box (``72 / dpi`` points, half a point at 144 dpi). PyMuPDF's
    ``get_text`` and drawing methods use the unrotated page: on a rotated page, multiply by
    ``page.derotation_matrix`` first. Rounded outward to 0.01 pt.

    None when ``dpi`` is None: an image's page. PyMuPDF gives an image a page size from the
    resolution the file declares (96 dpi when it declares none), but the page image the pipeline
    keeps may have been scaled down to the pixel limit and has lost that resolution, so no point
    size can be stated truthfully; ``bbox`` (pixels) and ``bbox_norm`` remain.
    """
    if dpi is None:
        return None
    scale = 72 / dpi
    x0, y0, x1, y1 = (v * scale for v in pixels)
    # round() first so float noise (5 px at 100 dpi is 359.99999999999994 hundredths of a point)
    # never moves a bound a step out.
    return [
        math.floor(round(x0 * 100, 6)) / 100,
        math.floor(round(y0 * 100, 6)) / 100,
        math.ceil(round(x1 * 100, 6)) / 100,
        math.ceil(round(y1 * 100, 6)) / 100,
    ]


def _add_points(entry: dict[str, Any], dpi: float | None) -> None:
    """Give a layout block ``bbox_pt`` (and ``boxes_pt`` where it has ``boxes``) from its pixels."""
    bbox = entry["bbox"]
    entry["bbox_pt"] = None if bbox is None else to_points(bbox, dpi)
    if "boxes" in entry:
        entry["boxes_pt"] = None if dpi is None else [to_points(box, dpi) for box in entry["boxes"]]


def _box_entry(label: str, box: Box, pixels: Box) -> dict[str, Any]:
    return {"type": label, "bbox": list(pixels), "bbox_norm": list(box)}


def _to_pixels(box: Box, size: tuple[int, int]) -> Box:
    """A 0-999 box in page pixels: v / 999 * side, outward (floor, then ceil), clamped to the page."""
    width, height = size
    x0, y0, x1, y1 = box
    # Integer arithmetic: in floats 63 / 999 * 999 is 62.99999999999999, which floors to 62.
    return (
        min(width, max(0, x0 * width // 999)),
        min(height, max(0, y0 * height // 999)),
        min(width, max(0, -(-x1 * width // 999))),
        min(height, max(0, -(-y1 * height // 999))),
    )


def _has_area(bbox: Box) -> bool:
    return bbox[2] > bbox[0] and bbox[3] > bbox[1]
