"""Assembling parsed pages into Markdown, layout entries and figure crops."""

from __future__ import annotations

import io

from PIL import Image, ImageDraw

from app.engines.base import END_MARKER
from app.pipeline.assemble import AssembledPage, assemble_page, merge_markdown
from app.pipeline.grounding import Block, ParsedPage, parse_page
from app.pipeline.pages import PageImage

WIDTH, HEIGHT = 1000, 1400
RED = (200, 30, 30)
BLUE = (20, 40, 220)

# The figure box [100, 200, 600, 500] in page pixels: floor(100 * 1000 / 999) = 100,
# floor(200 * 1400 / 999) = 280, ceil(600 * 1000 / 999) = 601, ceil(500 * 1400 / 999) = 701.
FIGURE_PIXELS = (100, 280, 601, 701)

RAW = (
    "<|ref|>title<|/ref|><|det|>[[62, 20, 512, 50]]<|/det|>\nAnnual Report\n2023\n\n"
    "<|ref|>sub_title<|/ref|><|det|>[[62, 60, 400, 80]]<|/det|>\n## 1. Results\n\n"
    "<|ref|>text<|/ref|><|det|>[[62, 90, 937, 120], [62, 130, 480, 150]]<|/det|>\n"
    "Revenue grew by 12 %.\n\n"
    "<|ref|>image<|/ref|><|det|>[[100, 200, 600, 500]]<|/det|>\n\n"
    "<|ref|>image_caption<|/ref|><|det|>[[100, 510, 600, 530]]<|/det|>\nFigure 1: Growth.\n\n"
    "<|ref|>table<|/ref|><|det|>[[62, 550, 937, 700]]<|/det|>\n"
    "<table><tr><td>Year</td><td>Revenue</td></tr><tr><td>2023</td><td>1.2</td></tr></table>\n\n"
    "<|ref|>equation<|/ref|><|det|>[[200, 720, 800, 760]]<|/det|>\n\\[ E = m c^{2} \\]\n\n"
    "<|ref|>footnote<|/ref|><|det|>[[-40, 950, 1200, 999]]<|/det|>\n<script>alert(1)</script>\n" + END_MARKER
)


def _page(number: int = 1, dpi: float | None = 144.0) -> PageImage:
    """A white page with a red rectangle exactly where the figure box falls."""
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    x0, y0, x1, y1 = FIGURE_PIXELS
    ImageDraw.Draw(image).rectangle((x0, y0, x1 - 1, y1 - 1), fill=RED)
    return PageImage(number=number, image=image, dpi=dpi)


def _parsed(*blocks: Block) -> ParsedPage:
    return ParsedPage(blocks=list(blocks), finished=True, truncated_reason=None)


def test_markdown_renders_each_block_type() -> None:
    page = assemble_page(_page(), parse_page(RAW), index=0)

    assert page.markdown == (
        "# Annual Report 2023\n\n"
        "## 1. Results\n\n"
        "Revenue grew by 12 %.\n\n"
        "![](images/p0001_01.png)\n\n"
        "Figure 1: Growth.\n\n"
        "<table><tr><td>Year</td><td>Revenue</td></tr><tr><td>2023</td><td>1.2</td></tr></table>\n\n"
        "\\[ E = m c^{2} \\]\n\n"
        "<script>alert(1)</script>"
    )


def test_the_figure_is_cropped_from_the_page() -> None:
    page = assemble_page(_page(), parse_page(RAW), index=0)

    [(name, png)] = page.crops
    crop = Image.open(io.BytesIO(png), formats=["PNG"])
    assert name == "p0001_01.png"
    assert crop.mode == "RGB"
    assert crop.size == (501, 421)
    assert crop.getcolors() == [(501 * 421, RED)]


def test_layout_lists_every_block_in_pixels_and_on_the_model_scale() -> None:
    page = assemble_page(_page(number=7), parse_page(RAW), index=2)

    assert page.index == 2
    assert page.number == 7
    assert {key: value for key, value in page.layout.items() if key != "blocks"} == {
        "index": 2,
        "page": 7,
        "width": WIDTH,
        "height": HEIGHT,
        "dpi": 144.0,
        "truncated": False,
        "truncated_reason": None,
    }
    title, sub_title, text, image, caption, table, equation, footnote = page.layout["blocks"]
    assert title == {
        "type": "title",
        "bbox": [62, 28, 513, 71],
        "bbox_norm": [62, 20, 512, 50],
        "bbox_pt": [31.0, 14.0, 256.5, 35.5],  # pixels * 72 / 144 dpi
        "text": "Annual Report\n2023",
    }
    assert text == {
        "type": "text",
        "bbox": [62, 126, 938, 211],
        "bbox_norm": [62, 90, 937, 150],
        "boxes": [[62, 126, 938, 169], [62, 182, 481, 211]],
        "boxes_norm": [[62, 90, 937, 120], [62, 130, 480, 150]],
        "bbox_pt": [31.0, 63.0, 469.0, 105.5],
        "boxes_pt": [[31.0, 63.0, 469.0, 84.5], [31.0, 91.0, 240.5, 105.5]],
        "text": "Revenue grew by 12 %.",
    }
    assert image == {
        "type": "image",
        "bbox": list(FIGURE_PIXELS),
        "bbox_norm": [100, 200, 600, 500],
        "bbox_pt": [50.0, 140.0, 300.5, 350.5],
        "image": "images/p0007_01.png",
    }
    assert table["text"].startswith("<table><tr><td>Year</td>")
    assert equation["text"] == "\\[ E = m c^{2} \\]"
    assert [block["type"] for block in (sub_title, caption)] == ["sub_title", "image_caption"]
    # A box beyond the page is clamped on the model's scale, then spans the page's full width.
    assert footnote == {
        "type": "footnote",
        "bbox": [0, 1331, WIDTH, HEIGHT],
        "bbox_norm": [0, 950, 999, 999],
        "bbox_pt": [0.0, 665.5, 500.0, 700.0],
        "text": "<script>alert(1)</script>",
    }


def test_an_image_with_several_boxes_gives_a_crop_and_a_layout_block_per_box() -> None:
    parsed = _parsed(
        Block("image", ((100, 200, 600, 500), (0, 0, 999, 999)), "Two panels."),
        Block("image", ((700, 800, 900, 900),), ""),
    )

    page = assemble_page(_page(number=3), parsed, index=0)

    assert [(name, Image.open(io.BytesIO(png)).size) for name, png in page.crops] == [
        ("p0003_01.png", (501, 421)),
        ("p0003_02.png", (WIDTH, HEIGHT)),
        ("p0003_03.png", (201, 141)),
    ]
    assert page.markdown == (
        "![](images/p0003_01.png)\n\n![](images/p0003_02.png)\n\nTwo panels.\n\n![](images/p0003_03.png)"
    )
    assert [block["image"] for block in page.layout["blocks"]] == [
        "images/p0003_01.png",
        "images/p0003_02.png",
        "images/p0003_03.png",
    ]
    assert page.layout["blocks"][0]["text"] == "Two panels."
    assert "text" not in page.layout["blocks"][1]


def test_an_image_box_empty_in_pixels_gets_no_crop_and_no_link_but_stays_in_the_layout() -> None:
    # Built by hand: the parser never yields a box off the 0-999 scale, but nothing else stops one.
    parsed = _parsed(
        Block("image", ((999, 100, 1200, 200),), ""), Block("image", ((100, 200, 600, 500),), "")
    )

    page = assemble_page(_page(), parsed, index=0)

    assert [name for name, _ in page.crops] == ["p0001_01.png"]
    assert page.markdown == "![](images/p0001_01.png)"
    assert page.layout["blocks"][0] == {
        "type": "image",
        "bbox": [WIDTH, 140, WIDTH, 281],
        "bbox_norm": [999, 100, 1200, 200],
        "bbox_pt": [500.0, 70.0, 500.0, 140.5],
    }


def test_blocks_without_boxes_have_a_null_bbox() -> None:
    parsed = _parsed(
        Block("text", (), "Running head"), Block("image", (), "A figure the model could not place.")
    )

    page = assemble_page(_page(), parsed, index=0)

    assert page.crops == []
    assert page.markdown == "Running head\n\nA figure the model could not place."
    assert page.layout["blocks"] == [
        {"type": "text", "bbox": None, "bbox_norm": None, "bbox_pt": None, "text": "Running head"},
        {
            "type": "image",
            "bbox": None,
            "bbox_norm": None,
            "bbox_pt": None,
            "text": "A figure the model could not place.",
        },
    ]


def test_headings_get_their_marker_once_and_empty_blocks_no_markdown() -> None:
    parsed = _parsed(
        Block("title", ((1, 1, 9, 9),), "# Already marked"),
        Block("sub_title", ((1, 1, 9, 9),), "Methods"),
        Block("title", ((1, 1, 9, 9),), ""),
        Block("text", ((1, 1, 9, 9),), ""),
        Block("Margin Note", ((1, 1, 9, 9),), "kept as is"),
    )

    page = assemble_page(_page(), parsed, index=0)

    assert page.markdown == "# Already marked\n\n## Methods\n\nkept as is"
    assert len(page.layout["blocks"]) == 5


def test_a_truncated_page_keeps_its_usable_part_and_is_flagged() -> None:
    loop = "<|ref|>text<|/ref|><|det|>[[62, 800, 937, 830]]<|/det|>\nThe committee met again.\n\n"
    raw = RAW.removesuffix(END_MARKER) + loop * 30 + loop[:20]

    page = assemble_page(_page(dpi=None), parse_page(raw, "max_tokens"), index=0)

    assert page.truncated
    assert page.truncated_reason == "repetition"
    assert page.layout["truncated"] is True
    assert page.layout["truncated_reason"] == "repetition"
    assert page.layout["dpi"] is None
    assert page.markdown.startswith("# Annual Report 2023\n\n")
    assert page.markdown.endswith("<script>alert(1)</script>\n\nThe committee met again.")
    assert page.markdown.count("The committee met again.") == 1


def _assembled(index: int, markdown: str) -> AssembledPage:
    return AssembledPage(
        index=index,
        number=index + 1,
        markdown=markdown,
        layout={},
        crops=[],
        truncated=False,
        truncated_reason=None,
    )


def test_merge_markdown_joins_pages_in_order_with_one_trailing_newline() -> None:
    pages = [_assembled(2, "Third\n\n"), _assembled(0, "# First"), _assembled(1, "")]

    assert merge_markdown(pages) == "# First\n\nThird\n"
    assert merge_markdown([]) == "\n"
