"""The document split back into its blocks, and the sample every export test converts.

``build_sample`` makes a two-page report with PyMuPDF, renders it with the pipeline's own renderer,
writes the grounded output DeepSeek-OCR gives for it (boxes measured from PyMuPDF's text and image
positions) and runs that through ``app.pipeline.grounding`` and ``app.pipeline.assemble``, exactly
as the worker does: the exports are tested on the files a task really produces.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pymupdf
from PIL import Image, ImageDraw

from app.documents import DocumentKind
from app.engines.base import END_MARKER
from app.formats.segments import read_document, units
from app.pipeline.assemble import AssembledPage, assemble_page, merge_markdown
from app.pipeline.grounding import parse_page
from app.pipeline.outputs import StoredPage
from app.pipeline.pages import open_document

DPI = 100  # not 72 or 144: points and pixels differ by a factor that is not a round number
A4 = (595, 842)
TITLE = "Annual Report 2023"
RESULTS = "1. Results"
OUTLOOK = "2. Outlook"
FIGURE_CAPTION = "Figure 1: Revenue by year."
TABLE_CAPTION = "Table 1: Revenue in million EUR"
PARAGRAPH_1 = (
    "Revenue grew by twelve percent in 2023, driven by the new product line and by a stronger "
    "second half. Costs rose more slowly than revenue. The board proposes a higher dividend. "
    "Cash flow from operations reached a record, and the company repaid part of its debt early. "
    "Headcount grew by forty people, most of them in engineering and customer support teams."
)
PARAGRAPH_2 = (
    "For 2024 the company expects revenue to grow again, if more slowly. Three new markets open "
    "in spring. Investment in research stays at a tenth of revenue. Risks remain: prices of "
    "energy, the exchange rate and the pace of hiring. The outlook assumes no change in tax law. "
    "A detailed plan for each market will be published with the results of the first quarter."
)
# What the model copies from a hostile page: the exports must show it as text, never run it.
HOSTILE = 'Note <script>window.pwned = 1</script><img src="x" onerror="window.pwned = 2"> end.'
TABLE_HTML = (
    '<table><tr><th colspan="2">Revenue by year</th></tr><tr><td>Year</td><td>Revenue</td></tr>'
    "<tr><td>2022</td><td>1.1</td></tr><tr><td>2023</td><td>1.2</td></tr></table>"
)
EQUATION = "\\[ E = m c^{2} + \\frac{a}{b} \\]"
INLINE_MATH = "Growth follows \\(r = \\sqrt{x}\\) closely."


@dataclass
class Sample:
    """A task's result as the worker stores it, and the PDF it came from."""

    pdf: bytes
    pages: list[AssembledPage]
    result: dict[str, Any]  # result.json, parsed
    full_md: str  # full.md
    crops: dict[str, bytes]  # images/<name> -> PNG bytes


def _picture() -> bytes:
    image = Image.new("RGB", (300, 200), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    draw.rectangle((20, 120, 80, 190), fill=(200, 30, 30))
    draw.rectangle((120, 60, 180, 190), fill=(30, 30, 200))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _norm(rect: pymupdf.Rect) -> list[int]:
    """A rectangle in points as the model gives it: 0-999 of the page's width and height."""
    width, height = A4
    return [
        round(rect.x0 / width * 999),
        round(rect.y0 / height * 999),
        round(rect.x1 / width * 999),
        round(rect.y1 / height * 999),
    ]


def _words_rect(page: pymupdf.Page, clip: pymupdf.Rect) -> pymupdf.Rect:
    rect = pymupdf.Rect()
    for word in page.get_text("words", clip=clip):
        rect |= pymupdf.Rect(word[:4])
    return rect


def _block(label: str, rect: pymupdf.Rect, content: str) -> str:
    return f"<|ref|>{label}<|/ref|><|det|>[{_norm(rect)}]<|/det|>\n{content}\n\n"


def _page_one(page: pymupdf.Page, picture: bytes) -> str:
    page.insert_text((72, 80), TITLE, fontsize=22)
    page.insert_text((72, 118), RESULTS, fontsize=15)
    text_box = pymupdf.Rect(72, 130, 523, 250)
    page.insert_textbox(text_box, PARAGRAPH_1, fontsize=10)
    image_rect = pymupdf.Rect(150, 270, 450, 470)
    page.insert_image(image_rect, stream=picture)
    page.insert_text((150, 490), FIGURE_CAPTION, fontsize=9)
    page.insert_text((72, 800), HOSTILE, fontsize=8)
    return (
        _block("title", _words_rect(page, pymupdf.Rect(60, 50, 540, 90)), TITLE)
        + _block("sub_title", _words_rect(page, pymupdf.Rect(60, 95, 540, 125)), RESULTS)
        + _block("text", _words_rect(page, text_box), PARAGRAPH_1)
        + _block("image", image_rect, "")
        + _block("image_caption", _words_rect(page, pymupdf.Rect(140, 475, 540, 500)), FIGURE_CAPTION)
        + _block("text", _words_rect(page, pymupdf.Rect(60, 785, 540, 810)), HOSTILE)
        + END_MARKER
    )


def _page_two(page: pymupdf.Page) -> str:
    page.insert_text((72, 80), OUTLOOK, fontsize=15)
    page.insert_text((72, 110), TABLE_CAPTION, fontsize=9)
    table = pymupdf.Rect(72, 120, 372, 200)
    page.draw_rect(table)
    for row, cells in enumerate(
        (("Revenue by year",), ("Year", "Revenue"), ("2022", "1.1"), ("2023", "1.2"))
    ):
        for column, cell in enumerate(cells):
            page.insert_text((80 + 150 * column, 135 + 20 * row), cell, fontsize=9)
    page.insert_text((250, 240), "E = mc2 + a/b", fontsize=12)
    page.insert_text((72, 280), "Growth follows r = sqrt(x) closely.", fontsize=10)
    text_box = pymupdf.Rect(72, 300, 523, 420)
    page.insert_textbox(text_box, PARAGRAPH_2, fontsize=10)
    return (
        _block("sub_title", _words_rect(page, pymupdf.Rect(60, 60, 540, 90)), OUTLOOK)
        + _block("table_caption", _words_rect(page, pymupdf.Rect(60, 100, 540, 115)), TABLE_CAPTION)
        + _block("table", table, TABLE_HTML)
        + _block("equation", _words_rect(page, pymupdf.Rect(240, 225, 400, 245)), EQUATION)
        + _block("text", _words_rect(page, pymupdf.Rect(60, 268, 540, 285)), INLINE_MATH)
        + _block("text", _words_rect(page, text_box), PARAGRAPH_2)
        + END_MARKER
    )


def build_sample(tmp_path: Path) -> Sample:
    """The two-page report, converted by the real pipeline stages (see the module docstring)."""
    document = pymupdf.open()
    raw = [
        _page_one(document.new_page(width=A4[0], height=A4[1]), _picture()),
        _page_two(document.new_page(width=A4[0], height=A4[1])),
    ]
    pdf = document.tobytes()
    document.close()
    path = tmp_path / "report.pdf"
    path.write_bytes(pdf)
    pages: list[AssembledPage] = []
    with open_document(path, DocumentKind.PDF) as rendered:
        for index, text in enumerate(raw):
            image = rendered.render(index + 1, dpi=DPI, max_pixels=50_000_000)
            pages.append(assemble_page(image, parse_page(text), index))
    crops: dict[str, bytes] = {}
    for page in pages:
        for name, png in page.crops:
            crops[name] = png
    # The page entries of result.json, as the worker writes them.
    result = {
        "task_id": "t1",
        "source": {"filename": "report.pdf"},
        "pages": [StoredPage.of(page).result_entry() for page in pages],
    }
    return Sample(pdf=pdf, pages=pages, result=result, full_md=merge_markdown(pages), crops=crops)


def test_the_rebuilt_markdown_is_full_md_and_every_block_has_its_span(tmp_path: Path) -> None:
    sample = build_sample(tmp_path)

    document = read_document(sample.result)

    assert document.markdown == sample.full_md
    cited = {(s.page.index, s.block) for s in document.segments}
    for page in sample.result["pages"]:
        for index, block in enumerate(page["blocks"]):
            assert (page["index"], index) in cited, block
    for segment in document.segments:
        assert segment.block is not None
        block = segment.page.blocks[segment.block]
        text = document.text(segment)
        if segment.role == "link":
            assert text == f"![]({block.image})"
        else:
            assert " ".join((block.text or "").split()) in " ".join(text.split())
    # In order, without overlaps, and nothing but whitespace between them.
    ends = [0] + [s.end for s in document.segments]
    for segment, previous_end in zip(document.segments, ends, strict=False):
        assert segment.start >= previous_end
        assert not sample.full_md[previous_end : segment.start].strip()


def test_units_keep_figures_with_captions_and_tables_with_theirs(tmp_path: Path) -> None:
    document = read_document(build_sample(tmp_path).result)

    grouped = units(document)

    kinds = [(unit.kind, [s.type for s in unit.segments]) for unit in grouped]
    assert kinds == [
        ("heading", ["title"]),
        ("heading", ["sub_title"]),
        ("text", ["text"]),
        ("figure", ["image", "image_caption"]),
        ("text", ["text"]),
        ("heading", ["sub_title"]),
        ("table", ["table_caption", "table"]),
        ("equation", ["equation"]),
        ("text", ["text"]),
        ("text", ["text"]),
    ]
    assert [unit.level for unit in grouped if unit.kind == "heading"] == [1, 2, 2]


def test_text_no_block_claims_is_kept_and_a_wrapped_title_is_found() -> None:
    # A page whose Markdown holds text no block names (a hand-edited or older result), and a title
    # the model wrapped over two lines, which assemble joined into one heading line.
    result = {
        "pages": [
            {
                "index": 0,
                "page": 1,
                "markdown": "# A long title\n\nOrphan text.\n\nBody.",
                "blocks": [{"type": "title", "text": "A long\ntitle"}, {"type": "text", "text": "Body."}],
            }
        ]
    }

    document = read_document(result)

    assert [(document.text(s), s.block) for s in document.segments] == [
        ("# A long title", 0),
        ("Orphan text.", None),
        ("Body.", 1),
    ]
