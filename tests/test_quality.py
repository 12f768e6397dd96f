"""The quality signal of issue 17 on born-digital PDFs made here: the text layer and ink the render
path reports, the agreement of a page's Markdown with that layer, and the reasons a page is suspect."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pymupdf
import pytest
from PIL import Image, ImageDraw

from app.documents import DocumentKind
from app.engines.base import END_MARKER, PageText, StopReason
from app.metrics import Metrics
from app.pipeline.grounding import parse_page
from app.pipeline.pages import TEXT_LAYER_MAX_CHARS, PageImage, open_document
from app.pipeline.quality import REASONS, PageQuality, assess
from app.pipeline.render_pool import RenderPool

MAX_PIXELS = 40_000_000  # the service's default APP_MAX_PAGE_PIXELS
MIN_AGREEMENT = 0.5  # the service's default APP_QUALITY_MIN_AGREEMENT

LEFT = (
    "Solar farms in the northern valley produced more electricity this spring than in any season "
    "since the plant opened. Engineers credit new tracking mounts that follow the sun across the sky. "
    "Maintenance crews replaced forty inverters during the winter shutdown. The regional grid "
    "operator expects storage batteries to arrive before the summer peak."
)
RIGHT = (
    "Quarterly revenue grew by twelve percent while shipping costs fell in most regions. The board "
    "approved a dividend of three cents per share, payable in October. Analysts had forecast weaker "
    "demand for industrial pumps, yet orders from mining customers doubled. Management will present "
    "the revised outlook at the annual meeting in Zurich."
)
OTHER = (
    "Migratory birds rest on the lake every autumn, and volunteers count them at dawn with binoculars "
    "and notebooks. Last year they recorded herons, cranes, grebes and a rare white-tailed eagle that "
    "nested near the old mill. The count helps biologists track how wetlands recover after drought."
)
CJK = (
    "深度求索发布了新的光学字符识别模型，能够把扫描的文档页面转换为结构化文本。"
    "每一页都会得到质量信号，用户因此知道应该在多大程度上信任识别结果。"
    "对于双栏排版的论文，模型按照栏目顺序阅读，而文本层可能按照其他顺序排列。"
    "重复输出是视觉语言模型常见的问题，服务会自动重试可疑的页面。"
)
CJK_OTHER = (
    "春天的公园里开满了桃花和樱花，孩子们在草地上放风筝，老人们坐在长椅上聊天。"
    "湖边的柳树刚刚发芽，几只白鹭站在浅水里寻找小鱼，远处传来悠扬的笛声。"
)


def _pdf(tmp_path: Path, draw: Callable[[pymupdf.Page], object], name: str = "page.pdf") -> Path:
    """A one-page US-letter PDF drawn by ``draw``."""
    path = tmp_path / name
    with pymupdf.open() as document:
        draw(document.new_page(width=612, height=792))
        document.save(path)
    return path


def _render(path: Path, kind: DocumentKind = DocumentKind.PDF) -> PageImage:
    """Page 1 as the render process renders it (``render_child`` calls ``Document.render``)."""
    with open_document(path, kind) as document:
        return document.render(1, dpi=144, max_pixels=MAX_PIXELS)


def _text(*blocks: str, finished: bool = True) -> str:
    """The model's raw grounded output: each block a text block with a box, then the end marker."""
    body = "\n\n".join(
        f"<|ref|>text<|/ref|><|det|>[[50, {100 * i}, 950, {100 * i + 90}]]<|/det|>\n{block}"
        for i, block in enumerate(blocks)
    )
    return body + (END_MARKER if finished else "")


def _assess(
    raw: str,
    *,
    layer: str | None = None,
    has_ink: bool = True,
    stop_reason: StopReason | None = None,
) -> PageQuality:
    reason: StopReason = stop_reason or ("eos" if END_MARKER in raw else "max_tokens")
    page_text = PageText(text=raw, stop_reason=reason, tokens=0)
    return assess(
        page_text,
        parse_page(raw, reason),
        text_layer=layer,
        has_ink=has_ink,
        min_agreement=MIN_AGREEMENT,
    )


@pytest.fixture
def two_columns(tmp_path: Path) -> PageImage:
    def draw(page: pymupdf.Page) -> None:
        page.insert_textbox(pymupdf.Rect(50, 60, 296, 740), LEFT, fontsize=11)
        page.insert_textbox(pymupdf.Rect(316, 60, 562, 740), RIGHT, fontsize=11)

    return _render(_pdf(tmp_path, draw))


@pytest.fixture
def cjk_page(tmp_path: Path) -> PageImage:
    def draw(page: pymupdf.Page) -> None:
        page.insert_textbox(pymupdf.Rect(50, 60, 562, 740), CJK, fontsize=14, fontname="china-s")

    return _render(_pdf(tmp_path, draw))


# --- what the render path reports -------------------------------------------------------------------


def test_the_render_path_returns_a_pdf_pages_text_layer_and_its_ink(two_columns: PageImage) -> None:
    assert two_columns.text_layer is not None
    assert "inverters" in two_columns.text_layer
    assert "Zurich" in two_columns.text_layer
    assert two_columns.has_ink


def test_a_word_split_at_a_lines_end_hyphen_is_whole_in_the_text_layer(tmp_path: Path) -> None:
    page = _render(
        _pdf(tmp_path, lambda page: page.insert_text((72, 72), "optical character recog-\nnition"))
    )
    assert page.text_layer is not None
    assert "recognition" in page.text_layer.split()


def test_a_blank_pdf_page_has_no_text_layer_and_no_ink(tmp_path: Path) -> None:
    page = _render(_pdf(tmp_path, lambda page: None))
    assert (page.text_layer, page.has_ink) == (None, False)


def test_a_page_of_only_white_text_has_a_layer_but_no_ink(tmp_path: Path) -> None:
    page = _render(_pdf(tmp_path, lambda page: page.insert_text((72, 72), LEFT[:60], color=(1, 1, 1))))
    assert page.text_layer is not None
    assert page.text_layer.startswith("Solar farms")
    assert not page.has_ink


def test_images_have_no_text_layer_and_ink_only_where_something_is_drawn(tmp_path: Path) -> None:
    blank = Image.new("RGB", (1200, 1600), "white")
    # A scan of a blank page: grey show-through, isolated dark specks and dark edges are not content.
    scan = Image.new("RGB", (1200, 1600), (236, 236, 236))
    pen = ImageDraw.Draw(scan)
    for i in range(400):
        pen.point(((i * 7919) % 1200, (i * 104729) % 1600), fill=(20, 20, 20))
    pen.rectangle((0, 0, 20, 1599), fill=(10, 10, 10))
    words = Image.new("RGB", (1200, 1600), "white")
    ImageDraw.Draw(words).text((300, 700), "Hello world", fill="black", font_size=28)
    results = {}
    for name, image in (("blank", blank), ("scan", scan), ("words", words)):
        image.save(tmp_path / f"{name}.png")
        page = _render(tmp_path / f"{name}.png", DocumentKind.PNG)
        results[name] = (page.text_layer, page.has_ink)
    assert results == {"blank": (None, False), "scan": (None, False), "words": (None, True)}


async def test_the_render_processes_carry_the_text_layer_and_ink_back(tmp_path: Path) -> None:
    """Through a real render process: a CJK layer too long for a JSON frame (200,000 characters are
    1.2 MB as JSON escapes) comes back whole up to the cap, and a blank page's flags with it."""
    line = CJK[:68] * 2  # 136 characters, no line break inside a run

    def huge(page: pymupdf.Page) -> None:
        page.insert_text((5, 5), "\n".join([line] * 2000), fontsize=0.3, fontname="china-s")

    huge_pdf = _pdf(tmp_path, huge, "huge.pdf")
    blank_pdf = _pdf(tmp_path, lambda page: None, "blank.pdf")
    async with RenderPool(processes=1, page_seconds=60, memory_mb=2048) as pool:
        big = await pool.render(huge_pdf, DocumentKind.PDF, 1, dpi=72, max_pixels=MAX_PIXELS)
        blank = await pool.render(blank_pdf, DocumentKind.PDF, 1, dpi=72, max_pixels=MAX_PIXELS)
    assert big.text_layer is not None
    assert len(big.text_layer) == TEXT_LAYER_MAX_CHARS
    assert "".join(big.text_layer.split()).startswith(line * 3)  # lines of a block may join with a space
    assert (blank.text_layer, blank.has_ink) == (None, False)


async def test_a_text_layer_past_the_memory_ceiling_is_dropped_and_the_page_still_renders(
    tmp_path: Path,
) -> None:
    """10.8 million characters in 28 kB (a form drawn 2,000 times): MuPDF needs about 850 MB to
    extract them, the render alone under 384 MiB. The page keeps its image and goes without a text
    layer (``Page.get_text`` would have kept the failed extraction's memory, failing the encoding and the
    page), and the next page renders with its own."""
    line = "Lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt. "
    with pymupdf.open() as words, pymupdf.open() as forty, pymupdf.open() as document:
        words.new_page().insert_text((5, 5), "\n".join([line] * 60), fontsize=1)
        forty.new_page()
        for _ in range(40):
            forty[0].show_pdf_page(forty[0].rect, words, 0)
        page = document.new_page()
        for _ in range(50):
            page.show_pdf_page(page.rect, forty, 0)
        document.save(tmp_path / "dense.pdf", garbage=3, deflate=True)
    normal = _pdf(tmp_path, lambda page: page.insert_text((72, 72), OTHER[:80]), "normal.pdf")
    async with RenderPool(processes=1, page_seconds=60, memory_mb=512) as pool:
        dense = await pool.render(tmp_path / "dense.pdf", DocumentKind.PDF, 1, dpi=72, max_pixels=MAX_PIXELS)
        after = await pool.render(normal, DocumentKind.PDF, 1, dpi=72, max_pixels=MAX_PIXELS)
    assert (dense.text_layer, dense.has_ink, dense.encoded is not None) == (None, True, True)
    assert after.text_layer == OTHER[:80] + "\n"


# --- agreement ----------------------------------------------------------------------------------------


def test_the_right_markdown_agrees_with_a_two_column_page_in_either_column_order(
    two_columns: PageImage,
) -> None:
    left_first = _assess(_text("## Energy", LEFT, RIGHT), layer=two_columns.text_layer)
    right_first = _assess(_text(RIGHT, LEFT), layer=two_columns.text_layer)
    # Read across the columns, line by line, as some text layers run.
    halves = [sentence + "." for sentence in (LEFT + " " + RIGHT).split(". ")]
    across = _assess(_text(" ".join(halves[::2]), " ".join(halves[1::2])), layer=two_columns.text_layer)
    for quality in (left_first, right_first, across):
        assert quality.text_layer_agreement is not None
        assert quality.text_layer_agreement >= 0.97
        assert quality.reasons == ()


def test_a_page_missing_a_column_or_read_twice_agrees_less_and_the_wrong_text_is_suspect(
    two_columns: PageImage,
) -> None:
    half = _assess(_text(LEFT), layer=two_columns.text_layer)
    wrong = _assess(_text(OTHER), layer=two_columns.text_layer)
    # Read twice: every word is there, but half of what the user gets is not on the page.
    twice = _assess(_text(LEFT, RIGHT, LEFT, RIGHT), layer=two_columns.text_layer)
    assert twice.text_layer_agreement is not None
    assert 0.6 <= twice.text_layer_agreement <= 0.7
    assert half.text_layer_agreement is not None
    assert 0.55 <= half.text_layer_agreement <= 0.75
    assert not half.suspect
    assert wrong.text_layer_agreement is not None
    assert wrong.text_layer_agreement < 0.2
    assert wrong.reasons == ("low_agreement",)


def test_markup_is_not_compared(tmp_path: Path) -> None:
    """Headings, emphasis, HTML tables, entities and LaTeX are markup: the words inside count."""
    table = "".join(
        f"<tr><td>{city}</td><td>{people}</td></tr>"
        for city, people in (("Lyon", "522,000"), ("Basel", "178,000"), ("Turin", "848,000"))
    )

    def draw(page: pymupdf.Page) -> None:
        page.insert_htmlbox(
            pymupdf.Rect(50, 50, 562, 740),
            f"<h1>Cities &amp; people</h1><p>{OTHER} The ratio is α over β.</p>"
            f"<table><tr><th>City</th><th>People</th></tr>{table}</table>",
        )

    layer = _render(_pdf(tmp_path, draw)).text_layer
    markdown = _text(
        "# Cities &amp; people",
        f"**{OTHER[:40]}**{OTHER[40:]} The ratio is $\\frac{{\\alpha}}{{}}$ over $\\beta$.",
        f"<table><tr><th>City</th><th>People</th></tr>{table}</table>",
    )
    quality = _assess(markdown, layer=layer)
    assert quality.text_layer_agreement is not None
    assert quality.text_layer_agreement >= 0.95


def test_cjk_agreement_works_without_spaces(cjk_page: PageImage) -> None:
    assert cjk_page.text_layer is not None
    assert "光学字符识别" in cjk_page.text_layer
    sentences = CJK.split("。")
    reordered = _text(sentences[2] + "。", "。".join(sentences[:2] + sentences[3:]))
    right = _assess(reordered, layer=cjk_page.text_layer)
    wrong = _assess(_text(CJK_OTHER), layer=cjk_page.text_layer)
    assert right.text_layer_agreement is not None
    assert right.text_layer_agreement >= 0.95
    assert right.reasons == ()
    assert wrong.text_layer_agreement is not None
    assert wrong.text_layer_agreement < 0.2
    assert wrong.reasons == ("low_agreement",)


def test_a_page_without_a_text_layer_or_with_a_few_words_has_no_agreement() -> None:
    assert _assess(_text(LEFT), layer=None).text_layer_agreement is None
    # A page number stamped on a scanned page says nothing about the rest of it.
    stamped = _assess(_text(LEFT), layer="Page 12 of 40")
    assert (stamped.text_layer_agreement, stamped.reasons) == (None, ())


# --- repeating tails --------------------------------------------------------------------------------


def test_a_runaway_loop_is_a_repeating_tail() -> None:
    row = "<tr><td>0.00</td><td>0.00</td><td>n/a</td></tr>"
    runaway = _assess(_text(LEFT, f"<table>{row * 200}", finished=False), layer=LEFT)
    assert runaway.reasons == ("no_end_marker", "repeating_tail")
    # A loop that the model did end is still one.
    words = _assess(_text(LEFT, "the same words " * 60))
    assert words.reasons == ("repeating_tail",)
    dots = _assess(_text(LEFT, "Total" + "." * 3000, finished=False))
    assert dots.reasons == ("no_end_marker", "repeating_tail")


def test_a_long_real_table_and_a_blank_form_are_not_a_repeating_tail() -> None:
    rows = "".join(f"<tr><td>{n}</td><td>Item {n}</td><td>{n * 37 % 101}.50</td></tr>" for n in range(120))
    table = f"<table><tr><th>No</th><th>Item</th><th>Price</th></tr>{rows}</table>"
    assert _assess(_text(table)).reasons == ()
    # Cut by the token cap in the middle of the table: unfinished, but not a loop.
    assert _assess(_text(table[: len(table) // 2], finished=False)).reasons == ("no_end_marker",)
    form = "<table>" + "<tr><td></td><td></td><td></td></tr>" * 30 + "</table>"
    assert _assess(_text("Visitors", form)).reasons == ()
    markdown = "| No | Item |\n| --- | --- |\n" + "".join(f"| {n} | Item {n} |\n" for n in range(80))
    assert _assess(_text(markdown)).reasons == ()


def test_a_table_of_contents_with_dot_leaders_is_not_a_repeating_tail() -> None:
    chapters = ("Introduction", "Methods", "Results", "Discussion", "References")
    toc = "\n".join(f"{n}. {title} {'.' * (90 - len(title))} {n * 7}" for n, title in enumerate(chapters, 1))
    assert _assess(_text("# Contents", toc)).reasons == ()
    # Cut in the middle of a leader: a line's worth of dots is not a loop.
    assert _assess(_text("# Contents", toc[:-3], finished=False)).reasons == ("no_end_marker",)


# --- empty output ----------------------------------------------------------------------------------


def test_empty_output_is_suspect_only_where_the_page_has_content(tmp_path: Path) -> None:
    inked = _render(_pdf(tmp_path, lambda page: page.insert_text((72, 72), "Chapter one", fontsize=20)))
    blank = _render(_pdf(tmp_path, lambda page: None, "blank.pdf"))
    nothing = END_MARKER
    assert _assess(nothing, layer=inked.text_layer, has_ink=inked.has_ink).reasons == ("empty_output",)
    assert _assess(nothing, layer=blank.text_layer, has_ink=blank.has_ink).reasons == ()
    # Markup with no words in it is empty too; a text layer with words says there is content.
    no_words = "<table><tr><td></td></tr></table>" + END_MARKER
    assert _assess(no_words, has_ink=True).reasons == ("empty_output",)
    assert _assess(nothing, layer="Confidential", has_ink=False).reasons == ("empty_output",)


def test_a_page_of_figures_is_not_empty_output() -> None:
    figure = "<|ref|>image<|/ref|><|det|>[[100, 100, 900, 800]]<|/det|>" + END_MARKER
    assert _assess(figure, has_ink=True).reasons == ()


# --- boxes -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "det",
    [
        "[[50, 100, 1040, 200]]",  # past the right edge
        "[[-5, 100, 500, 200]]",  # before the left edge
        "[[50, 100, 500, 200], [300, 400, 300, 500]]",  # no width
        "[[500, 100, 50, 200]]",  # corners swapped
        "[50, 900, 500, 1200]",  # a bare box past the bottom
    ],
)
def test_a_box_outside_the_page_or_without_area_is_suspect(det: str) -> None:
    raw = f"<|ref|>text<|/ref|><|det|>{det}<|/det|>\n{LEFT}{END_MARKER}"
    assert _assess(raw).reasons == ("box_outside_page",)
    # The parser clamps and drops such boxes, which is why the check reads the raw text.
    assert all(0 <= v <= 999 for block in parse_page(raw).blocks for box in block.boxes for v in box)


def test_boxes_on_the_page_and_a_det_cut_by_the_token_cap_are_not_suspect() -> None:
    edges = f"<|ref|>text<|/ref|><|det|>[[0, 0, 999, 999]]<|/det|>\n{LEFT}{END_MARKER}"
    assert _assess(edges).reasons == ()
    cut = _text(LEFT, finished=False) + "\n\n<|ref|>text<|/ref|><|det|>[[50, 900, 1"
    assert _assess(cut).reasons == ("no_end_marker",)


# --- keeping the best attempt ---------------------------------------------------------------------


def test_rank_keeps_a_clean_attempt_over_a_runaway_and_the_closer_of_two(two_columns: PageImage) -> None:
    layer = two_columns.text_layer
    runaway = _assess(_text(LEFT, RIGHT, "again " * 400, finished=False), layer=layer)
    empty = _assess(END_MARKER, layer=layer)
    cut = _assess(_text(LEFT, RIGHT[:100], finished=False), layer=layer)
    half = _assess(_text(LEFT), layer=layer)
    clean = _assess(_text(LEFT, RIGHT), layer=layer)
    assert runaway.reasons == ("no_end_marker", "repeating_tail")
    assert empty.reasons == ("empty_output", "low_agreement")
    assert cut.reasons == ("no_end_marker",)
    best_first = sorted([runaway, half, empty, cut, clean], key=PageQuality.rank, reverse=True)
    assert best_first == [clean, half, cut, runaway, empty]


def test_the_quality_object_and_the_metrics_a_user_sees(two_columns: PageImage) -> None:
    runaway = _assess(_text(LEFT, "again " * 400, finished=False), layer=two_columns.text_layer)
    assert runaway.as_json(attempts=3, rung=0) == {
        "text_layer_agreement": runaway.text_layer_agreement,
        "suspect": True,
        "reasons": ["no_end_marker", "repeating_tail"],
        "attempts": 3,
        "rung": 0,
    }
    assert set(runaway.reasons) <= set(REASONS)
    metrics = Metrics(gpu_probe=_NoGpu())
    metrics.observe_quality(runaway)
    metrics.observe_quality(_assess(_text(LEFT)))  # no layer: no agreement, not suspect
    samples = {
        (sample.name, tuple(sample.labels.items())): sample.value
        for family in metrics.registry.collect()
        for sample in family.samples
    }
    assert samples[("dsocr_page_text_agreement_count", ())] == 1
    assert samples[("dsocr_suspect_pages_total", (("reason", "repeating_tail"),))] == 1
    assert samples[("dsocr_suspect_pages_total", (("reason", "no_end_marker"),))] == 1
    assert ("dsocr_suspect_pages_total", (("reason", "empty_output"),)) not in samples


class _NoGpu:
    def memory(self) -> None:
        return None
