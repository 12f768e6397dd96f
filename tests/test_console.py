"""The web console in a real browser (Debian's Chromium driven by Playwright) against the real
service and the scripted tiny model: sign-in, upload, live progress, boxes over the page, rendered
Markdown and math, downloads, phone width, the keyboard, and hostile model output that must run
nothing."""

from __future__ import annotations

import datetime
import hashlib
import os
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pymupdf
import pytest

from tests.conftest import CHROMIUM
from tests.documents import (
    ANSWER_WELL,
    PICTURE_RECT,
    READ_BADLY,
    READ_WELL,
    make_pdf,
    norm_box,
    png_bytes,
    text_pdf,
)
from tests.test_api_e2e import PAGE_2 as TABLE_PAGE
from tests.test_api_e2e import finished, upload
from tests.test_shared_backends import shared_settings

# The README's screenshot: written when missing or with UPDATE_SCREENSHOTS=1, so that a plain test
# run leaves the working tree as it found it (the picture shows times that change on every run).
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "console.png"
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="Debian's chromium (/usr/bin/chromium) is not installed; .ci/run installs it",
)
TIMEOUT_MS = 30_000

# A paper-like first page, drawn where its scripted answer puts the boxes: the README's screenshot.
TITLE_RECT = (72, 64, 420, 94)
ABSTRACT_RECT = (72, 104, 523, 152)
SECTION_RECT = (72, 170, 220, 190)
TABLE_RECT = (72, 200, 380, 276)
CAPTION_RECT = (72, 282, 330, 296)
EQUATION_RECT = (220, 318, 380, 344)
TEXT_RECT = (72, 362, 523, 398)
TABLE_ROWS = (("backend", "pages/s", "GPU"), ("hf", "0.8", "A10"), ("vllm", "6.1", "A10"))
ABSTRACT = (
    "Every block keeps its box on the page, so a reader can check",
    "the text against the scan it came from.",
)
PAGE_1 = (
    f"<|ref|>title<|/ref|><|det|>[{norm_box(TITLE_RECT)}]<|/det|>\nReading pages at scale\n\n"
    f"<|ref|>text<|/ref|><|det|>[{norm_box(ABSTRACT_RECT)}]<|/det|>\n{' '.join(ABSTRACT)}\n\n"
    f"<|ref|>sub_title<|/ref|><|det|>[{norm_box(SECTION_RECT)}]<|/det|>\n1 Throughput\n\n"
    f"<|ref|>table<|/ref|><|det|>[{norm_box(TABLE_RECT)}]<|/det|>\n<table>"
    + "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in TABLE_ROWS)
    + "</table>\n\n"
    f"<|ref|>table_caption<|/ref|><|det|>[{norm_box(CAPTION_RECT)}]<|/det|>\nTable 1: pages per second.\n\n"
    f"<|ref|>equation<|/ref|><|det|>[{norm_box(EQUATION_RECT)}]<|/det|>\n\\[t = \\frac{{n}}{{r}}\\]\n\n"
    f"<|ref|>text<|/ref|><|det|>[{norm_box(TEXT_RECT)}]<|/det|>\n"
    "A document of \\(n\\) pages at rate \\(r\\) takes time \\(t\\)."
)
PAGE_2 = (
    "<|ref|>title<|/ref|><|det|>[[120, 60, 600, 100]]<|/det|>\n# Page 2 heading\n\n"
    "<|ref|>text<|/ref|><|det|>[[120, 110, 700, 140]]<|/det|>\nBody text of page 2."
)
PAGE_3 = (
    f"<|ref|>image<|/ref|><|det|>[{norm_box(PICTURE_RECT)}]<|/det|>\n\n"
    "<|ref|>image_caption<|/ref|><|det|>[[168, 600, 672, 630]]<|/det|>\nFigure 1: a red square."
)


def paper_pdf() -> bytes:
    """Three A4 pages: page 1 drawn to match ``PAGE_1``, then ``make_pdf``'s pages 2 and 3."""
    doc = pymupdf.open()
    page = doc.new_page(width=595, height=842)
    page.insert_text((TITLE_RECT[0], TITLE_RECT[3] - 8), "Reading pages at scale", fontsize=22)
    for line, text in enumerate(ABSTRACT):
        page.insert_text((ABSTRACT_RECT[0], ABSTRACT_RECT[1] + 12 + 15 * line), text, fontsize=10.5)
    page.insert_text((SECTION_RECT[0], SECTION_RECT[3] - 4), "1 Throughput", fontsize=14)
    x0, y0, x1, y1 = TABLE_RECT
    row_height = (y1 - y0) / len(TABLE_ROWS)
    column_width = (x1 - x0) / len(TABLE_ROWS[0])
    for r, row in enumerate(TABLE_ROWS):
        for c, cell in enumerate(row):
            cell_rect = pymupdf.Rect(
                x0 + c * column_width,
                y0 + r * row_height,
                x0 + (c + 1) * column_width,
                y0 + (r + 1) * row_height,
            )
            page.draw_rect(cell_rect, color=(0.3, 0.3, 0.3), width=0.6)
            page.insert_text((cell_rect.x0 + 6, cell_rect.y1 - 8), cell, fontsize=10.5)
    page.insert_text((CAPTION_RECT[0], CAPTION_RECT[3] - 3), "Table 1: pages per second.", fontsize=10)
    page.insert_text(
        (EQUATION_RECT[0] + 50, EQUATION_RECT[3] - 8), "t = n / r", fontsize=14, fontname="Times-Italic"
    )
    page.insert_text(
        (TEXT_RECT[0], TEXT_RECT[1] + 14), "A document of n pages at rate r takes time t.", fontsize=10.5
    )
    rest = pymupdf.open(stream=make_pdf(3), filetype="pdf")
    doc.insert_pdf(rest, from_page=1, to_page=2)
    data = doc.tobytes()
    rest.close()
    doc.close()
    return data


TABLE_AND_EQUATION = (
    "<|ref|>table<|/ref|><|det|>[[100, 200, 900, 400]]<|/det|>\n"
    "<table><tr><td>a</td><td>b</td></tr><tr><td>1</td><td>2</td></tr></table>\n\n"
    "<|ref|>equation<|/ref|><|det|>[[100, 450, 900, 500]]<|/det|>\n\\[E = mc^2\\]"
)
HOSTILE = (
    "<|ref|>text<|/ref|><|det|>[[100, 100, 900, 200]]<|/det|>\n<script>alert(1)</script>\n\n"
    "<|ref|>text<|/ref|><|det|>[[100, 250, 900, 300]]<|/det|>\n"
    '<img src=x onerror=alert(1)> and [x](javascript:alert(1)) and <a href="javascript:alert(1)">y</a>\n\n'
    '<|ref|>evil" onmouseover="alert(1)<|/ref|><|det|>[[100, 350, 900, 400]]<|/det|>\nlabel'
)
HOSTILE_NAME = "<img src=x onerror=alert(3)>.pdf"
# More tokens than the cap below: the page never reaches the end marker.
ENDLESS = "<|ref|>text<|/ref|><|det|>[[50, 50, 950, 950]]<|/det|>\nWords without end: " + " ".join(
    f"w{n}" for n in range(300)
)

# The browser logs every 4xx a fetch() gets, the expected 401 of a wrong key included.
REFUSED_KEY_LOG = "status of 401"


class Console:
    """A browser tab on the console that records console errors, uncaught exceptions and dialogs."""

    def __init__(self, browser: Any, url: str, **context: Any) -> None:
        self.context = browser.new_context(viewport={"width": 1280, "height": 800}, **context)
        self.context.set_default_timeout(TIMEOUT_MS)
        self.page = self.context.new_page()
        self.url = url
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda exc: self.errors.append(f"uncaught: {exc}"))
        self.page.on("dialog", self._dialog)

    def _dialog(self, dialog: Any) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def open(self) -> Any:
        response = self.page.goto(f"{self.url}/")
        self.page.wait_for_selector("#sign-in:not([hidden])")
        return response

    def sign_in(self, key: str) -> None:
        self.page.fill("#key", key)
        self.page.click("#sign-in-form button[type=submit]")

    def tab_to(self, selector: str, presses: int = 40) -> None:
        """Press Tab until the focused element matches ``selector``."""
        for _ in range(presses):
            self.page.keyboard.press("Tab")
            if self.page.evaluate("(s) => document.activeElement.matches(s)", selector):
                return
        raise AssertionError(f"{selector} is not reachable with Tab")

    def no_horizontal_scroll(self) -> bool:
        return self.page.evaluate(
            "() => document.documentElement.scrollWidth <= document.documentElement.clientWidth"
        )

    def block_ids(self, selector: str) -> set[str]:
        return set(self.page.eval_on_selector_all(selector, "nodes => nodes.map(n => n.dataset.block)"))

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def console(browser: Any) -> Iterator[Any]:
    opened: list[Console] = []

    def open_console(url: str, **context: Any) -> Console:
        tab = Console(browser, url, **context)
        opened.append(tab)
        return tab

    yield open_console
    for tab in opened:
        tab.close()


@needs_chromium
def test_console_signs_in_converts_and_shows_a_document(make_server, console, tmp_path):
    server = make_server(answers=[PAGE_1, PAGE_2, PAGE_3], ds_max_new_tokens=600, ds_batch_size=3)
    tab = console(server.url, accept_downloads=True)
    page = tab.page

    response = tab.open()
    assert page.url == f"{server.url}/ui/"
    headers = response.headers
    csp = headers["content-security-policy"]
    assert "script-src 'self'" in csp
    assert "default-src 'none'" in csp
    assert "unsafe-inline" not in csp
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "no-referrer"

    tab.sign_in("sk_wrong")
    page.wait_for_selector("#sign-in-error:has-text('refused')")
    assert page.evaluate("() => sessionStorage.length") == 0
    assert [e for e in tab.errors if REFUSED_KEY_LOG not in e] == []
    tab.errors.clear()  # the browser's own log line for that 401

    tab.sign_in("sk_test")
    page.wait_for_selector("#home:not([hidden])")
    assert "sk_test" not in page.url
    page.locator("body").focus()
    tab.tab_to("#pick")

    page.set_input_files(
        "#files", files=[{"name": "paper.pdf", "mimeType": "application/pdf", "buffer": paper_pdf()}]
    )
    row = page.locator(".task", has_text="paper.pdf")
    row.locator(".task__count", has_text="3/3 pages").wait_for()
    row.locator(".badge", has_text="succeeded").wait_for()
    assert row.locator(".task__meta").inner_text().count("pages/s") == 1
    task_id = row.get_attribute("data-task-id")
    page.screenshot(path=str(tmp_path / "home.png"))
    layout = server.client.get(f"/v1/tasks/{task_id}/layout.json").json()

    tab.tab_to(".task__name")  # the row is reachable by keyboard, and opens with Enter
    page.keyboard.press("Enter")
    page.wait_for_selector(".stage .box")
    assert page.url.endswith(f"#/tasks/{task_id}/1")

    for entry in layout["pages"]:
        page.select_option("#page-select", str(entry["page"]))
        page.wait_for_function(
            "(n) => location.hash.endsWith('/' + n) && document.querySelectorAll('.rendered .block').length",
            arg=entry["page"],
        )
        boxed = {str(i) for i, block in enumerate(entry["blocks"]) if block["bbox"]}
        page.wait_for_function(
            "(n) => new Set([...document.querySelectorAll('.stage .box')].map(b => b.dataset.block)).size"
            " === n",
            arg=len(boxed),
        )
        assert tab.block_ids(".stage .box") == boxed
        assert tab.block_ids(".rendered .block") == {str(i) for i in range(len(entry["blocks"]))}

    # Page 3: the figure, in its block and in the gallery, from the crop route.
    page.wait_for_selector(".rendered .block__figure[src^='blob:']")
    page.wait_for_selector(".figures__image[src^='blob:']")

    page.select_option("#page-select", "1")
    rendered = page.locator(".rendered")
    table = rendered.locator(".block[data-block='3'] table")
    table.wait_for()
    assert table.locator("td").all_inner_texts() == [cell for row in TABLE_ROWS for cell in row]
    assert rendered.locator(".block[data-block='0'] h1").inner_text() == "Reading pages at scale"
    assert rendered.locator(".block[data-block='2'] h2").inner_text() == "1 Throughput"
    equation = rendered.locator(".block[data-block='5'] math")
    assert equation.get_attribute("display") == "block"
    assert equation.locator("mfrac").count() == 1
    assert rendered.locator(".block[data-block='6'] math[display='inline']").count() == 3
    assert "\\[t = \\frac{n}{r}\\]" in page.locator(".raw").inner_text()

    page.hover(".stage .box[data-block='3']")
    page.wait_for_selector(".rendered .block[data-block='3'].is-active")
    page.hover(".rendered .block[data-block='5']")
    page.wait_for_selector(".stage .box[data-block='5'].is-active")
    assert page.locator(".rendered .block.is-active").count() == 1
    page.focus(".stage .box[data-block='1']")  # the keyboard gets the same highlight
    page.wait_for_selector(".rendered .block[data-block='1'].is-active")
    page.evaluate("() => document.activeElement.blur()")
    page.click(".stage .box[data-block='3']")  # a click keeps it marked, for the screenshot

    page.mouse.move(0, 0)
    page.wait_for_function("() => !document.querySelector('.stage__placeholder')", timeout=5000)
    shot = tmp_path / "task.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size < 300_000  # small enough to keep in the repository
    if os.environ.get("UPDATE_SCREENSHOTS") == "1" or not SCREENSHOT.exists():
        SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(shot, SCREENSHOT)

    with page.expect_download() as download:
        page.click(".downloads button:has-text('result.zip')")
    assert download.value.suggested_filename == "paper.zip"
    with zipfile.ZipFile(download.value.path()) as archive:
        names = set(archive.namelist())
    assert {"full.md", "layout.json", "result.json", "images/p0003_01.png"} <= names
    with page.expect_download() as download:
        page.click(".downloads button:has-text('result.md')")
    assert "# Reading pages at scale" in Path(download.value.path()).read_text(encoding="utf-8")
    # The exports, saved as files (never opened on the console's origin).
    for label, suffix, starts in (
        ("chunks.json", ".chunks.json", b'{"version":1'),
        ("result.html", ".html", b"<!DOCTYPE html>"),
        ("result.docx", ".docx", b"PK"),
    ):
        with page.expect_download() as download:
            page.click(f".downloads button:has-text('{label}')")
        assert download.value.suggested_filename == f"paper{suffix}"
        assert Path(download.value.path()).read_bytes().startswith(starts), label

    page.set_viewport_size({"width": 375, "height": 800})
    page.wait_for_function("() => document.documentElement.clientWidth === 375")
    assert tab.no_horizontal_scroll()
    page.screenshot(path=str(tmp_path / "task-phone.png"), full_page=True)
    page.click(".back")
    page.wait_for_selector("#home:not([hidden]) .task")
    assert tab.no_horizontal_scroll()
    page.screenshot(path=str(tmp_path / "home-phone.png"), full_page=True)

    assert tab.errors == []


@needs_chromium
def test_a_scaled_out_service_that_redirects_downloads_still_serves_the_console(
    redis_server, s3, make_server, console
):
    # APP_S3_REDIRECT_DOWNLOADS sends downloads to the bucket, another origin the console's CSP does
    # not allow: it asks for them streamed (?redirect=false) and must show and save them all the same.
    settings = shared_settings(redis_server, s3, s3_redirect_downloads=True)
    server = make_server(answers=[PAGE_1, PAGE_2, PAGE_3], ds_max_new_tokens=600, ds_batch_size=3, **settings)
    task_id = upload(server.client, paper_pdf()).json()["task_id"]
    assert finished(server.client, task_id)["status"] == "succeeded"
    assert server.client.get(f"/v1/tasks/{task_id}/result.md").status_code == 307  # others are redirected

    tab = console(server.url, accept_downloads=True)
    page = tab.page
    tab.open()
    tab.sign_in("sk_test")
    page.wait_for_selector("#home:not([hidden])")
    page.goto(f"{server.url}/ui/#/tasks/{task_id}/3")
    page.wait_for_selector(".stage .box")
    page.wait_for_selector(".rendered .block__figure[src^='blob:']")  # the crop, from the bucket
    with page.expect_download() as download:
        page.click(".downloads button:has-text('result.md')")
    assert "# Reading pages at scale" in Path(download.value.path()).read_text(encoding="utf-8")
    assert tab.errors == []


@needs_chromium
def test_hostile_model_output_runs_nothing(make_server, console):
    # No retry ladder: a retry of the endless page would get the next scripted answer and finish.
    server = make_server(answers=[HOSTILE, ENDLESS], ds_max_new_tokens=300, ds_batch_size=1, page_retries=0)
    tab = console(server.url)
    page = tab.page
    tab.open()
    tab.sign_in("sk_test")
    page.wait_for_selector("#home:not([hidden])")
    # Two files at once through the picker: each becomes a task, in order.
    hostile = {"name": HOSTILE_NAME, "mimeType": "application/pdf", "buffer": make_pdf(2, picture_page=None)}
    photo = {"name": "photo.png", "mimeType": "image/png", "buffer": png_bytes()}
    page.set_input_files("#files", files=[hostile, photo])
    page.locator(".uploads .is-ok").nth(1).wait_for()
    for name in (HOSTILE_NAME, "photo.png"):
        page.locator(".task", has_text=name).locator(".badge", has_text="succeeded").wait_for()
    assert page.locator("#task-list .task__name").all_inner_texts() == ["photo.png", HOSTILE_NAME]
    row = page.locator(".task", has_text=HOSTILE_NAME)
    done = server.client.get(f"/v1/tasks/{row.get_attribute('data-task-id')}").json()
    assert done["truncated_pages"] == [2]

    row.locator(".task__name").click()
    page.wait_for_selector(".rendered .block[data-block='2']")
    assert page.locator(".task-view__title").inner_text() == HOSTILE_NAME
    assert "truncated" in page.locator("#page-select option[value='2']").inner_text()
    page.hover(".stage .box[data-block='2']")  # the label that tried to become an attribute
    page.hover(".rendered .block[data-block='1']")

    rendered = page.locator(".rendered")
    assert rendered.locator("script").count() == 0
    assert rendered.locator("img").count() == 0
    assert page.locator("[onerror], [onmouseover], [onclick]").count() == 0
    hrefs = rendered.locator("a").evaluate_all("links => links.map(a => a.getAttribute('href'))")
    assert all(href is None or not href.lower().startswith("javascript:") for href in hrefs)
    assert page.evaluate("() => document.querySelectorAll('script').length") == 1  # the console's own
    raw = page.locator(".raw").inner_text()
    assert "<script>alert(1)</script>" in raw  # shown as text
    assert page.locator(".stage .box[data-block='2']").get_attribute("aria-label").startswith('evil" onmouse')

    page.select_option("#page-select", "2")
    page.wait_for_selector(".notice:not([hidden])")
    assert "max_tokens" in page.locator(".notice").inner_text()
    page.wait_for_timeout(200)  # a handler that was going to fire has had its chance
    assert tab.dialogs == []
    assert tab.errors == []


@needs_chromium
def test_event_stream_parser_splits_any_framing(make_server, console):
    server = make_server()
    tab = console(server.url)
    tab.open()
    # CRLF, LF and lone CR line ends, comments, multi-line data, fed one character at a time so every
    # line end arrives split; the console's own module, imported as the page imports it.
    events = tab.page.evaluate(
        """async () => {
            const { createParser } = await import("./sse.js");
            const events = [];
            const parser = createParser((event) => events.push(event));
            const text = 'id: 1\\r\\nevent: status\\r\\ndata: {"a": 1}\\r\\n\\r\\n: ping\\n\\n'
                + 'id: 2\\nevent: page\\ndata: x\\ndata:y\\n\\nretry: 5\\n\\n'
                + 'id: 3\\revent: end\\rdata: z\\r\\r';
            for (const char of text) parser.feed(char);
            parser.end();
            return events;
        }"""
    )
    assert events == [
        {"id": "1", "event": "status", "data": '{"a": 1}'},
        {"id": "2", "event": "page", "data": "x\ny"},
        {"id": "3", "event": "end", "data": "z"},
    ]
    assert tab.errors == []


@needs_chromium
def test_a_running_task_is_followed_live_and_a_queued_one_cancelled(make_server, console):
    server = make_server(answers=[PAGE_2], page_delay=0.4, ds_batch_size=1)
    running = upload(server.client, make_pdf(3, picture_page=None), name="slow.pdf").json()
    queued = upload(server.client, make_pdf(1, picture_page=None), name="waiting.pdf").json()
    tab = console(server.url)
    page = tab.page
    tab.open()
    tab.sign_in("sk_test")
    waiting = page.locator(f".task[data-task-id='{queued['task_id']}']")
    waiting.locator(".badge", has_text="queued").wait_for()
    waiting.get_by_role("button", name="Cancel").click()
    waiting.locator(".badge", has_text="canceled").wait_for()
    assert waiting.get_by_role("button", name="Cancel").is_hidden()

    page.goto(f"{server.url}/ui/#/tasks/{running['task_id']}")
    page.wait_for_selector(".task-view__title:has-text('slow.pdf')")
    assert page.locator("#task .badge").inner_text() in ("queued", "running")
    page.wait_for_selector("#task .task__count:has-text('3/3 pages')")  # from the event stream
    page.wait_for_selector("#task .badge:has-text('succeeded')")
    page.wait_for_selector(".stage .box[data-block='1']")  # the result, once it exists
    assert server.client.get(f"/v1/tasks/{queued['task_id']}").json()["status"] == "canceled"
    assert tab.errors == []


@needs_chromium
def test_the_task_list_pages_and_takes_drops_and_urls(make_server, console, static_server):
    server = make_server(queue_max=50, url_allow_private=True)
    document = make_pdf(1, picture_page=None)
    names = [f"doc{n:02d}.pdf" for n in range(23)]
    for name in names:
        assert upload(server.client, document, name=name).status_code == 202
    tab = console(server.url)
    page = tab.page
    tab.open()
    tab.sign_in("sk_test")
    shown = page.locator("#task-list .task__name")
    page.wait_for_function("() => document.querySelectorAll('#task-list .task').length === 20")
    assert shown.all_inner_texts() == names[::-1][:20]  # newest first
    assert page.locator("#newer").is_disabled()
    page.click("#older")
    page.wait_for_function("() => document.querySelectorAll('#task-list .task').length === 3")
    assert shown.all_inner_texts() == names[::-1][20:]
    assert page.locator("#older").is_disabled()
    page.click("#newer")
    page.wait_for_function("() => document.querySelectorAll('#task-list .task').length === 20")
    assert shown.first.inner_text() == names[-1]

    # A file dropped on the drop zone becomes the newest task, and the page keeps 20 rows.
    dropped = page.evaluate_handle(
        """(bytes) => {
            const files = new DataTransfer();
            files.items.add(new File([new Uint8Array(bytes)], "dropped.png", { type: "image/png" }));
            return files;
        }""",
        list(png_bytes()),
    )
    page.dispatch_event("#drop", "drop", {"dataTransfer": dropped})
    shown.first.filter(has_text="dropped.png").wait_for()
    assert shown.count() == 20

    page.fill("#url", static_server.add("fetched.png", png_bytes()))
    page.click("#url-form button[type=submit]")
    shown.first.filter(has_text="fetched.png").wait_for()
    assert page.input_value("#url") == ""
    assert tab.errors == []


def test_rendered_page_route(make_server):
    server = make_server(answers=[TABLE_AND_EQUATION, PAGE_3], api_keys="sk_test,sk_other")
    view = upload(server.client, make_pdf(2, picture_page=2)).json()
    done = finished(server.client, view["task_id"])
    path = f"/v1/tasks/{done['task_id']}/pages"

    page = server.client.get(f"{path}/1/rendered").json()
    assert (page["page"], page["index"], page["truncated"], page["truncated_reason"]) == (1, 0, False, None)
    assert (page["width"], page["height"]) == (1190, 1684)
    assert "\\[E = mc^2\\]" in page["markdown"]
    table, equation = page["blocks"]
    assert (table["index"], table["type"], table["image"]) == (0, "table", None)
    assert table["html"].startswith("<table>")
    assert table["boxes"] == [table["bbox"]]
    assert (equation["index"], equation["type"]) == (1, "equation")
    assert '<math xmlns="http://www.w3.org/1998/Math/MathML" display="block">' in equation["html"]

    figure, caption = server.client.get(f"{path}/2/rendered").json()["blocks"]
    assert (figure["type"], figure["image"], figure["html"]) == ("image", "p0002_01.png", "")
    assert server.client.get(f"/v1/tasks/{done['task_id']}/images/{figure['image']}").status_code == 200
    assert caption["html"] == "<p>Figure 1: a red square.</p>"

    missing = server.client.get(f"{path}/3/rendered")
    assert (missing.status_code, missing.json()["error"]["code"]) == (404, "result_not_found")
    assert httpx.get(f"{server.url}{path}/1/rendered").status_code == 401
    other_key = {"Authorization": "Bearer sk_other"}  # another key's task does not exist for it
    assert server.client.get(f"{path}/1/rendered", headers=other_key).status_code == 404


def test_console_can_be_switched_off(make_server):
    server = make_server(ui_enabled=False)
    with httpx.Client(base_url=server.url) as client:
        assert client.get("/ui/").status_code == 404
        root = client.get("/")
        assert root.status_code in (302, 307)
        assert root.headers["location"] == "/docs"
    on = make_server()
    with httpx.Client(base_url=on.url) as client:
        assert client.get("/").headers["location"] == "/ui/"
        index = client.get("/ui/")
        assert index.status_code == 200
        assert 'src="app.js"' in index.text
        module = client.get("/ui/app.js")
        assert module.headers["content-type"].startswith(("text/javascript", "application/javascript"))
        assert module.headers["content-security-policy"] == index.headers["content-security-policy"]


# --- issue 17: how far to trust each page; issue 18: the tenant's usage -------------------------


@needs_chromium
def test_suspect_pages_are_marked_with_their_reasons_and_can_be_picked_alone(make_server, console):
    # Page 2 runs away (no retries here): suspect for want of an end marker; pages 1 and 3 read
    # the words of their text layer.
    server = make_server(
        answers=[ANSWER_WELL, ENDLESS, ANSWER_WELL], ds_max_new_tokens=300, ds_batch_size=1, page_retries=0
    )
    view = upload(server.client, text_pdf(READ_WELL, READ_BADLY, READ_WELL), name="report.pdf").json()
    task_id = view["task_id"]
    assert finished(server.client, task_id)["suspect_pages"] == 1
    result = server.client.get(f"/v1/tasks/{task_id}/result.json").json()
    quality = {entry["page"]: entry["quality"] for entry in result["pages"]}
    assert [quality[n]["suspect"] for n in (1, 2, 3)] == [False, True, False]

    tab = console(server.url)
    page = tab.page
    tab.open()
    tab.sign_in("sk_test")
    row = page.locator(f".task[data-task-id='{task_id}']")
    row.locator(".task__meta", has_text="1 suspect page(s)").wait_for()

    page.goto(f"{server.url}/ui/#/tasks/{task_id}/1")
    page.wait_for_selector("label[for='suspect-only']:not([hidden])")
    assert page.locator("#task .task__meta").inner_text().endswith("1 suspect page(s)")
    assert page.locator("label[for='suspect-only']").inner_text().strip() == "Suspect pages only (1)"
    options = page.locator("#page-select option").all_inner_texts()
    agreement = {n: f"agreement {round(quality[n]['text_layer_agreement'] * 100)}%" for n in (1, 2, 3)}
    assert options == [
        f"Page 1 · {agreement[1]}",
        f"Page 2 · {agreement[2]} ⚠ suspect ⚠ truncated",
        f"Page 3 · {agreement[3]}",
    ]
    note = page.locator(".quality")
    assert note.inner_text() == f"Agreement with the PDF's text layer: {agreement[1].split()[-1]}."

    # The filter: only the suspect page is left to pick, and it is shown with its reasons.
    tab.tab_to("#suspect-only")
    page.keyboard.press("Space")
    page.wait_for_function("() => location.hash.endsWith('/2')")
    assert page.locator("#page-select option").evaluate_all("options => options.map(o => o.value)") == ["2"]
    assert page.locator(".pagebar .muted").inner_text() == "1 of 3 page(s)"
    assert page.locator(".pagebar button:has-text('Next')").is_disabled()
    suspect = page.locator(".quality--suspect")
    suspect.wait_for()
    assert suspect.locator(".quality__mark").inner_text() == "⚠ Suspect page"
    reasons = suspect.locator(".quality__reasons li")
    assert reasons.evaluate_all("items => items.map(li => li.dataset.reason)") == quality[2]["reasons"]
    ended = suspect.locator("li[data-reason='no_end_marker']").inner_text()
    assert ended == "the model never reached its end marker (no_end_marker)"
    page.wait_for_selector(".rendered .block")

    page.uncheck("#suspect-only")  # every page again, still on page 2
    page.wait_for_function("() => document.querySelectorAll('#page-select option').length === 3")
    assert page.input_value("#page-select") == "2"
    page.click(".pagebar button:has-text('Next')")
    page.wait_for_function("() => location.hash.endsWith('/3')")
    page.wait_for_selector(".quality:not(.quality--suspect)")

    page.set_viewport_size({"width": 375, "height": 800})
    page.wait_for_function("() => document.documentElement.clientWidth === 375")
    assert tab.no_horizontal_scroll()
    assert tab.errors == []


@needs_chromium
def test_the_usage_panel_shows_the_tenants_days_and_totals(make_server, console, tmp_path):
    # sk_test is a user tenant of its own (APP_API_KEYS); sk_ops an admin one from the tenants file.
    tenants = tmp_path / "tenants.yaml"
    ops_key = "sha256:" + hashlib.sha256(b"sk_ops").hexdigest()
    tenants.write_text(f'tenants:\n  - name: ops\n    keys: ["{ops_key}"]\n    role: admin\n')
    server = make_server(answers=[TABLE_PAGE], tenants_file=tenants)
    task_id = upload(server.client, make_pdf(2, picture_page=None)).json()["task_id"]
    assert finished(server.client, task_id)["status"] == "succeeded"
    today = datetime.datetime.now(datetime.UTC).date()
    window = {"from": str(today - datetime.timedelta(days=29)), "to": str(today)}
    usage = server.client.get("/v1/usage", params=window).json()
    [tenant] = usage["tenants"]
    assert tenant["total"]["pages"] == 2  # the figures the panel must show are the task's own

    tab = console(server.url)
    page = tab.page
    tab.open()
    tab.sign_in("sk_test")
    table = page.locator(f"#usage:not([hidden]) .usage__table[data-tenant='{tenant['tenant']}']")
    table.wait_for()
    assert table.locator("caption").inner_text() == tenant["tenant"]
    days = sorted(tenant["days"], key=lambda day: day["date"], reverse=True)
    shown = table.locator("tbody tr").evaluate_all("rows => rows.map(r => r.dataset.date)")
    assert shown == [day["date"] for day in days]
    assert str(today) in shown
    for field in ("tasks", "pages", "prompt_tokens", "completion_tokens"):
        assert table.locator(f"tbody tr[data-date='{today}'] td[data-field='{field}']").inner_text() == (
            f"{next(d for d in days if d['date'] == str(today))[field]:,}"
        )
        assert table.locator(f"tfoot td[data-field='{field}']").inner_text() == f"{tenant['total'][field]:,}"
    assert table.locator("tfoot td[data-field='tasks']").inner_text() == "1"
    page.set_viewport_size({"width": 375, "height": 800})
    page.wait_for_function("() => document.documentElement.clientWidth === 375")
    assert tab.no_horizontal_scroll()  # the wide table scrolls in its own box
    assert page.locator(".usage__table").count() == 1  # a user key sees its own tenant only
    assert tab.errors == []

    admin = console(server.url)
    admin.open()
    admin.sign_in("sk_ops")
    admin.page.locator(".usage__table[data-tenant='ops']").wait_for()
    listed = admin.page.locator(".usage__table").evaluate_all("tables => tables.map(t => t.dataset.tenant)")
    assert sorted(listed) == sorted([tenant["tenant"], "ops"])  # an admin key sees every tenant
    theirs = admin.page.locator(f".usage__table[data-tenant='{tenant['tenant']}']")
    assert theirs.locator("tfoot td[data-field='pages']").inner_text() == "2"
    idle = admin.page.locator(".usage__table[data-tenant='ops'] tbody")
    assert idle.inner_text().strip() == "Nothing in these days."
    assert admin.errors == []

    # A server older than usage accounting answers 404: the panel stays hidden, nothing breaks.
    older = console(server.url)
    older.context.route(
        "**/v1/usage?*",
        lambda route: route.fulfill(status=404, json={"detail": "Not Found"}),
    )
    older.open()
    older.sign_in("sk_test")
    older.page.wait_for_selector("#home:not([hidden]) .task")
    older.page.wait_for_timeout(300)  # the usage request has been answered by now
    assert older.page.locator("#usage").is_hidden()
    assert [e for e in older.errors if "status of 404" not in e] == []
