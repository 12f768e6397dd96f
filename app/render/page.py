"""One page of ``result.json`` as the web console shows it: each layout block's safe HTML.

Block ``index`` is the block's position in the page's ``blocks`` (the same list in ``layout.json``
and ``result.json``), so the console ties a box drawn on the page image to the HTML of its block.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field

from app.pipeline.assemble import block_markdown
from app.render.html import markdown_to_html

_IMAGE_LINK = re.compile(r"^images/(p\d{4}_\d{2}\.png)$")

Box = list[int]  # x0, y0, x1, y1 in pixels of the rendered page


class RenderedBlock(BaseModel):
    """One layout block: where it is on the page and its content as sanitised HTML."""

    index: int = Field(description="Position in the page's blocks, as in layout.json.")
    type: str = Field(description="The model's label: title, text, table, equation, image...")
    bbox: Box | None = Field(description="The block's box in page pixels; null when the model gave none.")
    boxes: list[Box] = Field(description="Every box of the block (one, several, or none), in page pixels.")
    html: str = Field(description="The block's content, rendered and sanitised; may be empty.")
    image: str | None = Field(
        default=None, description="The block's cropped figure, for GET /v1/tasks/{id}/images/{name}."
    )


class RenderedPage(BaseModel):
    """A result page: its size, truncation mark, raw Markdown and rendered blocks."""

    page: int = Field(description="The 1-based page number in the document.")
    index: int = Field(description="The page's position in the result.")
    width: int = Field(description="Width of the rendered page in pixels (the unit of the boxes).")
    height: int
    truncated: bool = Field(description="The model never reached its end marker on this page.")
    truncated_reason: str | None
    markdown: str = Field(description="The page's Markdown as in result.md, unrendered.")
    blocks: list[RenderedBlock]


class _StoredBlock(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str
    bbox: Box | None = None
    boxes: list[Box] | None = None
    text: str | None = None
    image: str | None = None


class StoredPage(BaseModel):
    """A page entry of ``result.json``, as the worker writes it (only the fields read here)."""

    model_config = ConfigDict(extra="ignore")

    index: int
    page: int
    width: int
    height: int
    markdown: str = ""
    truncated: bool = False
    truncated_reason: str | None = None
    blocks: list[_StoredBlock] = Field(default_factory=list)


def render_page(entry: StoredPage) -> RenderedPage:
    """Render every block of ``entry``; CPU work (Markdown, LaTeX, sanitising): run it in a thread."""
    return RenderedPage(
        page=entry.page,
        index=entry.index,
        width=entry.width,
        height=entry.height,
        truncated=entry.truncated,
        truncated_reason=entry.truncated_reason,
        markdown=entry.markdown,
        blocks=[_render_block(index, block) for index, block in enumerate(entry.blocks)],
    )


def _render_block(index: int, block: _StoredBlock) -> RenderedBlock:
    boxes = block.boxes or ([block.bbox] if block.bbox else [])
    image = None
    if block.image and (match := _IMAGE_LINK.match(block.image)):
        image = match.group(1)
    return RenderedBlock(
        index=index,
        type=block.type,
        bbox=block.bbox,
        boxes=boxes,
        # layout.json keeps a heading's text without its marker: put back as result.md has it.
        html=markdown_to_html(block_markdown(block.type, block.text)) if block.text else "",
        image=image,
    )
