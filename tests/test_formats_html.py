"""result.html: one self-contained page, checked in Chromium: nothing runs, math renders, images load."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from app.formats import stream_html
from tests.test_formats_segments import FIGURE_CAPTION, OUTLOOK, TITLE, Sample, build_sample


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Sample:
    return build_sample(tmp_path_factory.mktemp("sample"))


class Opened:
    """A tab that loaded the page from a file, with every request and console message it made."""

    def __init__(self, browser: Any, path: Path) -> None:
        self.context = browser.new_context()
        self.page = self.context.new_page()
        self.requests: list[str] = []
        self.messages: list[str] = []
        self.page.on("request", lambda request: self.requests.append(request.url))
        self.page.on("console", lambda message: self.messages.append(message.text))
        self.page.on("pageerror", lambda error: self.messages.append(str(error)))
        self.page.goto(path.as_uri())
        self.page.wait_for_load_state("load")

    def evaluate(self, script: str) -> Any:
        return self.page.evaluate(script)


@pytest.fixture(scope="module")
def opened(browser: Any, sample: Sample, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Opened]:
    path = tmp_path_factory.mktemp("html") / "result.html"
    path.write_bytes(b"".join(stream_html(sample.result, sample.crops)))
    tab = Opened(browser, path)
    yield tab
    tab.context.close()


def test_nothing_on_the_page_runs_or_loads_from_anywhere(opened: Opened) -> None:
    # The hostile footnote's <script> and onerror both set window.pwned if they ever run.
    assert opened.evaluate("window.pwned") is None
    assert (
        opened.evaluate("document.querySelectorAll('script, [onerror], iframe, object, embed').length") == 0
    )
    # One request: the page itself. The figure is inline, and the broken <img src=x> is gone.
    assert len(opened.requests) == 1
    assert opened.requests[0].startswith("file://")
    assert opened.messages == []
    text = opened.evaluate("document.body.innerText")
    assert "Note" in text
    assert "end." in text
    assert "window.pwned" not in text  # the script's content went with it


def test_headings_tables_and_text_are_there(opened: Opened) -> None:
    assert opened.evaluate("document.title") == "report.pdf"
    assert opened.evaluate("[...document.querySelectorAll('h1, h2')].map(h => h.textContent)") == [
        TITLE,
        "1. Results",
        OUTLOOK,
    ]
    cells = opened.evaluate("[...document.querySelectorAll('table th, table td')].map(c => c.textContent)")
    assert cells == ["Revenue by year", "Year", "Revenue", "2022", "1.1", "2023", "1.2"]
    assert opened.evaluate("document.querySelector('th').colSpan") == 2
    assert opened.evaluate("document.querySelectorAll('section.page').length") == 2


def test_latex_renders_as_mathml(opened: Opened) -> None:
    maths = opened.evaluate(
        "[...document.querySelectorAll('math')].map(m => ({"
        "  native: m instanceof MathMLElement, display: m.getAttribute('display'),"
        "  height: m.getBoundingClientRect().height, text: m.textContent}))"
    )
    assert [(m["native"], m["display"]) for m in maths] == [(True, "block"), (True, "inline")]
    display, inline = maths
    assert display["text"].replace(" ", "") == "E=mc2+ab"
    assert "√" in inline["text"] or opened.evaluate("document.querySelectorAll('msqrt').length") == 1
    # Laid out as mathematics: the fraction stacks a over b, so the display equation is taller
    # than a line of the inline one.
    fraction = opened.evaluate(
        "(() => { const f = document.querySelector('mfrac'); const [a, b] = f.children;"
        " return [a.getBoundingClientRect().bottom, b.getBoundingClientRect().top]; })()"
    )
    assert fraction[0] <= fraction[1]
    assert display["height"] > inline["height"]


def test_the_figure_loads_from_a_data_uri(opened: Opened, sample: Sample) -> None:
    images = opened.evaluate(
        "[...document.images].map(i => ({src: i.src, complete: i.complete, width: i.naturalWidth,"
        " height: i.naturalHeight, alt: i.alt, caption: i.closest('figure').querySelector('figcaption')"
        "?.textContent}))"
    )

    [image] = images
    [crop] = sample.crops.values()
    assert image["src"] == "data:image/png;base64," + base64.b64encode(crop).decode()
    assert image["complete"]
    assert (image["width"], image["height"]) == Image.open(io.BytesIO(crop)).size
    assert image["caption"].strip() == FIGURE_CAPTION
    assert image["alt"] == FIGURE_CAPTION


def test_a_crop_that_is_missing_leaves_its_caption(sample: Sample) -> None:
    html = b"".join(stream_html(sample.result, lambda name: None)).decode()

    assert "<img" not in html
    assert f"<figcaption><p>{FIGURE_CAPTION}</p></figcaption>" in html
