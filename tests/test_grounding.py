"""Parsing the model's grounded output: blocks, boxes, truncation and runaway repetition."""

from __future__ import annotations

import random
import time

import pytest

from app.engines.base import END_MARKER
from app.pipeline.grounding import Block, Box, cut_repetition, parse_page

PAD = "<｜▁pad▁｜>"

# A page as DeepSeek-OCR writes it: headers, each followed by its content.
PAGE = (
    "<|ref|>title<|/ref|><|det|>[[62, 40, 512, 71]]<|/det|>\n# Annual Report 2023\n\n"
    "<|ref|>text<|/ref|><|det|>[[62, 90, 937, 160], [62, 170, 480, 200]]<|/det|>\n"
    "Revenue grew by 12 % while costs stayed flat.\n\n"
    "<|ref|>table<|/ref|><|det|>[[62, 220, 937, 420]]<|/det|>\n"
    "<table><tr><td>Year</td><td>Revenue</td></tr><tr><td>2023</td><td>1.2</td></tr></table>\n\n"
    "<|ref|>equation<|/ref|><|det|>[[200, 440, 800, 480]]<|/det|>\n\\[ E = m c^{2} \\]\n\n"
    "<|ref|>image<|/ref|><|det|>[[100, 500, 600, 800]]<|/det|>\n\n"
    "<|ref|>image_caption<|/ref|><|det|>[[100, 810, 600, 840]]<|/det|>\nFigure 1: Growth.\n" + END_MARKER
)

# One paragraph the model keeps writing, header and all.
LOOP = "<|ref|>text<|/ref|><|det|>[[62, 300, 937, 330]]<|/det|>\nThe committee met again.\n\n"


def test_parse_page_reads_every_block_in_order() -> None:
    page = parse_page(PAGE, "eos")

    assert page.finished
    assert page.truncated_reason is None
    assert page.blocks == [
        Block("title", ((62, 40, 512, 71),), "# Annual Report 2023"),
        Block(
            "text",
            ((62, 90, 937, 160), (62, 170, 480, 200)),
            "Revenue grew by 12 % while costs stayed flat.",
        ),
        Block(
            "table",
            ((62, 220, 937, 420),),
            "<table><tr><td>Year</td><td>Revenue</td></tr><tr><td>2023</td><td>1.2</td></tr></table>",
        ),
        Block("equation", ((200, 440, 800, 480),), "\\[ E = m c^{2} \\]"),
        Block("image", ((100, 500, 600, 800),), ""),
        Block("image_caption", ((100, 810, 600, 840),), "Figure 1: Growth."),
    ]


def test_text_before_the_first_header_becomes_a_text_block_without_boxes() -> None:
    page = parse_page("Running head, page 4\n<|ref|>text<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>\nBody")

    assert page.blocks == [Block("text", (), "Running head, page 4"), Block("text", ((1, 2, 3, 4),), "Body")]


def test_end_marker_pad_tokens_and_what_follows_the_marker_are_dropped() -> None:
    raw = PAD + "<|ref|>text<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>\nDone." + END_MARKER + PAD + "garbage"

    page = parse_page(raw)

    assert page.finished
    assert page.blocks == [Block("text", ((1, 2, 3, 4),), "Done.")]


@pytest.mark.parametrize(
    ("det", "boxes"),
    [
        ("[[-20, 5, 1200, 40]]", ((0, 5, 999, 40),)),  # outside the 0-999 scale: clamped
        ("[[900, 800, 100, 200]]", ((100, 200, 900, 800),)),  # reversed corners: reordered
        ("[[10.4, 20.6, 30.5, 41.5]]", ((10, 21, 30, 42),)),  # floats: rounded
        ("[10, 20, 30, 40]", ((10, 20, 30, 40),)),  # one bare box
        ("[(10, 20, 30, 40), (50, 60, 70, 80),]", ((10, 20, 30, 40), (50, 60, 70, 80))),  # not JSON
        ("[[10, 20, 10, 40], [10, 20, 30, 20], [5, 5, 9, 9]]", ((5, 5, 9, 9),)),  # zero area: dropped
        ("[[1, 2, 3], [1, 2, 3, 4, 5], [1, 2, 3, 4]]", ((1, 2, 3, 4),)),  # not 4 numbers: dropped
        ('[[NaN, 1, 2, 3], ["1", 2, 3, 4], [true, 1, 2, 3], [1, 2, 3, 4]]', ((1, 2, 3, 4),)),
        ("[[1" + "0" * 400 + ", 2, 3, 4]]", ((3, 2, 999, 4),)),
        ("[[10, 20, 30", ()),  # malformed: no boxes, the text stays
        ("[[__import__('os').system('exit 3'), 1, 2, 3]]", ()),  # parsed as data, never run
        ("", ()),
        ("[" * 5000 + "]" * 5000, ()),
    ],
)
def test_boxes_are_parsed_as_data_and_cleaned(det: str, boxes: tuple[Box, ...]) -> None:
    page = parse_page(f"<|ref|>text<|/ref|><|det|>{det}<|/det|>\nKept text.{END_MARKER}")

    assert page.blocks == [Block("text", boxes, "Kept text.")]


def test_a_header_without_det_keeps_its_label_and_text() -> None:
    page = parse_page("<|ref|>sub_title<|/ref|>\n## Methods" + END_MARKER)

    assert page.blocks == [Block("sub_title", (), "## Methods")]


def test_unknown_labels_are_kept_as_given_and_empty_ones_read_as_text() -> None:
    raw = "<|ref|> Footer Note <|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>\nA\n<|ref|><|/ref|>\nB" + END_MARKER

    assert parse_page(raw).blocks == [Block("Footer Note", ((1, 2, 3, 4),), "A"), Block("text", (), "B")]


def test_stray_tags_are_removed_from_content() -> None:
    raw = (
        "<|grounding|>Convert the document to markdown.\n"
        "<|ref|>text<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>\nOne <|/ref|>two<|/det|> three "
        "<|det|>[[5, 6, 7, 8]]<|/det|>four<|grounding|>" + END_MARKER
    )

    assert parse_page(raw).blocks == [
        Block("text", (), "Convert the document to markdown."),
        Block("text", ((1, 2, 3, 4),), "One two three four"),
    ]


def test_content_is_passed_through_unescaped() -> None:
    raw = "<|ref|>text<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>\n<script>alert('x')</script> & <b>" + END_MARKER

    assert parse_page(raw).blocks[0].content == "<script>alert('x')</script> & <b>"


@pytest.mark.parametrize(
    "tail",
    [
        "<|ref|>tit",
        "<|ref|>title<|/ref|>",
        "<|ref|>title<|/re",
        "<|ref|>title<|/ref|><|de",
        "<|ref|>title<|/ref|><|det|>[[1",
        "<|",
        "<|/det",
        "<|gro",
    ],
)
def test_a_tag_cut_off_at_the_end_leaks_nothing(tail: str) -> None:
    page = parse_page("<|ref|>text<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>\nA full sentence.\n\n" + tail)

    assert page.blocks == [Block("text", ((1, 2, 3, 4),), "A full sentence.")]
    assert not page.finished
    assert page.truncated_reason == "incomplete"


@pytest.mark.parametrize("tail", ["]]<|", "]]<|/de", "]]<|/det|>", "]]<|/det|>\n"])
def test_a_header_cut_after_its_boxes_keeps_the_boxes(tail: str) -> None:
    page = parse_page("Intro\n<|ref|>image<|/ref|><|det|>[[100, 200, 300, 400" + tail, "max_tokens")

    assert page.blocks == [Block("text", (), "Intro"), Block("image", ((100, 200, 300, 400),), "")]


@pytest.mark.parametrize(("stop_reason", "expected"), [("max_tokens", "max_tokens"), ("timeout", "timeout")])
def test_an_unfinished_page_without_repetition_keeps_everything(stop_reason: str, expected: str) -> None:
    raw = PAGE.removesuffix(END_MARKER)

    page = parse_page(raw, stop_reason)

    assert not page.finished
    assert page.truncated_reason == expected
    assert page.blocks == parse_page(PAGE).blocks


def test_an_unfinished_page_is_incomplete_without_a_stop_reason() -> None:
    assert parse_page("Half a sent").truncated_reason == "incomplete"
    assert parse_page("Half a sent", "eos").truncated_reason == "incomplete"


def test_a_runaway_page_is_cut_to_one_copy_and_flagged() -> None:
    raw = PAGE.removesuffix(END_MARKER) + "\n" + LOOP * 40 + LOOP[:30]

    page = parse_page(raw, "max_tokens")

    assert not page.finished
    assert page.truncated_reason == "repetition"
    looped = Block("text", ((62, 300, 937, 330),), "The committee met again.")
    assert page.blocks == [*parse_page(PAGE).blocks, looped]


def test_a_finished_page_is_never_cut() -> None:
    raw = "<|ref|>text<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>\n" + "." * 200 + END_MARKER

    page = parse_page(raw)

    assert page.truncated_reason is None
    assert page.blocks[0].content == "." * 200


@pytest.mark.parametrize(
    ("prefix", "unit"),
    [
        ("Contents\n1 Introduction ", "."),
        ("<table><tr><td>0.1</td><td>", "0 "),
        ("The minutes state that the ", "committee "),
        ("Results:\n", "No further data was recorded for this sample.\n"),
        ("<table><tr><td>Name</td><td>Value</td></tr>", "<tr><td>n/a</td><td>0.00</td></tr>"),
        ("# Report\n\n", LOOP),
        ("", "x" * 1900 + "\n"),
    ],
)
def test_cut_repetition_keeps_one_copy_of_the_unit(prefix: str, unit: str) -> None:
    copies = max(3, 200 // len(unit) + 1)
    for partial in ("", unit[: len(unit) // 2]):
        cut, repeated = cut_repetition(prefix + unit * copies + partial)

        assert repeated
        assert cut == prefix + unit


def test_cut_repetition_ends_a_looping_line_at_its_line_end() -> None:
    # The loop's last characters also end the line before it, so the repetition starts mid-line.
    text = "Summary of the year.\n" + "The committee met again.\n" * 10

    assert cut_repetition(text) == ("Summary of the year.\nThe committee met again.\n", True)


def test_cut_repetition_prefers_the_loop_that_reaches_furthest_back() -> None:
    entry = "Chapter 7: Results and discussion " + "." * 45
    text = "Contents\n" + entry * 5

    assert cut_repetition(text) == ("Contents\n" + entry, True)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Short.",
        "Ha ha ha, said the reviewer.",
        "He said no, no, no.",
        "Totals\n" + "-" * 30,
        "<table><tr><td>1</td></tr><tr><td>1</td></tr><tr><td>1</td></tr></table>",
        "A paragraph that ends normally.\n\nAnother one that ends normally.\n\nA third one, ending here.",
        PAGE,
    ],
)
def test_cut_repetition_leaves_normal_text_alone(text: str) -> None:
    assert cut_repetition(text) == (text, False)


def _prose(size: int, seed: int) -> str:
    rng = random.Random(seed)
    words = ("the", "of", "revenue", "in", "a", "table", "figure", "growth", "cost", "year", "we", "report")
    text = ""
    while len(text) < size:
        text += " ".join(rng.choice(words) for _ in range(rng.randint(5, 20))) + ".\n"
    return text[:size]


@pytest.mark.parametrize(
    "text",
    [
        _prose(40_000, 1),
        "a" * 40_000,
        _prose(20_000, 2) + "ab" * 10_000,
        _prose(10_000, 3) + _prose(1_999, 4) * 16,
        _prose(20_000, 5) + LOOP * 250,
        _prose(39_950, 6) + "." * 50,
    ],
)
def test_cut_repetition_is_fast_on_a_long_page(text: str) -> None:
    assert len(text) >= 40_000
    # Best of three: the bound is on the algorithm, not on a busy machine's worst moment.
    timings = []
    for _ in range(3):
        start = time.perf_counter()
        cut_repetition(text)
        timings.append(time.perf_counter() - start)

    assert min(timings) < 0.05
