"""Markdown, LaTeX and raw HTML from the model to safe HTML (``app.render``)."""

from __future__ import annotations

import re

import pytest

from app.render import markdown_to_html, render_page
from app.render.math import latex_to_mathml
from app.render.page import StoredPage
from app.render.sanitize import sanitize

MATHML = 'xmlns="http://www.w3.org/1998/Math/MathML"'
FORBIDDEN_TAGS = ("img", "iframe", "svg", "style", "form", "input", "object", "embed", "base", "meta")


def test_commonmark_headings_lists_emphasis_and_code():
    html = markdown_to_html("# Title\n\n## Part\n\n- *one*\n- **two**\n\n1. `x < y`\n\n> quoted")
    assert "<h1>Title</h1>" in html
    assert "<h2>Part</h2>" in html
    assert "<li><em>one</em></li>" in html
    assert "<li><strong>two</strong></li>" in html
    assert "<code>x &lt; y</code>" in html
    assert "<blockquote>" in html


def test_tables_raw_html_and_pipe_tables_stay_tables():
    raw = markdown_to_html('<table><tr><td colspan="2">a</td><td onclick="x()">b</td></tr></table>')
    assert raw == '<table><tbody><tr><td colspan="2">a</td><td>b</td></tr></tbody></table>'
    pipes = markdown_to_html("| a | b |\n|---|---|\n| 1 | 2 |")
    assert "<th>a</th>" in pipes
    assert "<td>2</td>" in pipes


@pytest.mark.parametrize(
    ("markdown", "display"),
    [
        ("\\[E = mc^2\\]", "block"),
        ("$$E = mc^2$$", "block"),
        ("so \\(E = mc^2\\) holds", "inline"),
        ("so $E = mc^2$ holds", "inline"),
    ],
)
def test_latex_becomes_mathml(markdown, display):
    html = markdown_to_html(markdown)
    assert f'<math {MATHML} display="{display}">' in html
    assert "<msup><mi>c</mi><mn>2</mn></msup>" in html
    assert "\\(" not in html
    assert "$" not in html


def test_math_inside_raw_html_table_cells():
    html = markdown_to_html("<table><tr><td>\\(\\alpha_1\\)</td><td>\\[x\\]</td><td>$5</td></tr></table>")
    assert html.count("<math") == 2
    assert '<td><math xmlns="http://www.w3.org/1998/Math/MathML" display="inline">' in html
    assert "<msub><mi>α</mi><mn>1</mn></msub>" in html
    assert "<td>$5</td>" in html


def test_dollars_that_are_money_are_not_math():
    assert markdown_to_html("It costs $5 and $6.") == "<p>It costs $5 and $6.</p>"


def test_latex_that_does_not_parse_is_shown_as_its_source():
    assert latex_to_mathml("x_", display=False) == "<code>x_</code>"
    assert markdown_to_html("\\(<b>^^\\)") == "<p><code>&lt;b&gt;^^</code></p>"


@pytest.mark.parametrize(
    "hostile",
    [
        "<script>alert(1)</script>",
        "<img src=x onerror=alert(1)>",
        "![pixel](https://tracker.example/p.png)",
        '<a href="javascript:alert(1)">x</a>',
        "[x](javascript:alert(1))",
        "<a href='JaVaScRiPt:alert(1)'>x</a>",
        '<a href="java&#x09;script:alert(1)">x</a>',
        "<iframe src=https://evil.example></iframe>",
        "<svg><script>alert(1)</script></svg>",
        '<div style="background:url(https://evil.example)">x</div>',
        '<p id="sign-in" class="x">clobber</p>',
        "<form action=https://evil.example><input name=k></form>",
        "<math><mtext><table><mglyph><style><img src=x onerror=alert(1)>",
        "$\\href{javascript:alert(1)}{x}$",
        "$\\text{<script>alert(1)</script>}$",
        "<!-- <script>alert(1)</script> -->",
        "<object data=x></object><embed src=x><base href=https://evil.example/><meta http-equiv=refresh>",
        '<table><tr><td background="https://evil.example/x.png" onmouseover="alert(1)">a</td></tr></table>',
    ],
)
def test_hostile_input_is_neutralised(hostile):
    html = markdown_to_html(hostile).lower()
    assert "<script" not in html
    assert re.search(r"\son\w+\s*=", html) is None
    for tag in FORBIDDEN_TAGS:
        assert f"<{tag}" not in html
    for attribute in ("style=", "id=", "class=", "src=", "background=", "action="):
        assert attribute not in html
    assert not re.search(r'href="(?!https?:|mailto:)', html)


def test_links_keep_safe_urls_and_open_apart():
    html = markdown_to_html(
        "[docs](https://example.org/a?b=1) [mail](mailto:a@example.org) [rel](images/x.png)"
    )
    assert '<a href="https://example.org/a?b=1" target="_blank" rel="noopener noreferrer">docs</a>' in html
    assert 'href="mailto:a@example.org"' in html
    assert "<a" in html
    assert 'href="images/x.png"' not in html


@pytest.mark.parametrize(
    "latex",
    [
        "\\mathrm{d}x + \\left( \\frac{1}{2} \\right)",
        "\\color{red}{x} \\boxed{y} a\\hspace{1cm}b",
        "\\begin{array}{lr} a & b \\\\ c & d \\end{array}",
        "\\overline{x} \\underbrace{y}_{z} \\sum_{i=1}^n \\binom{n}{k} \\mathbb{R}",
        "\\begin{cases} a & b \\end{cases} \\xrightarrow{f} \\cancel{x}",
    ],
)
def test_sanitize_keeps_what_latex2mathml_writes(latex):
    mathml = latex_to_mathml(latex, display=True)
    assert "<code>" not in mathml
    safe = sanitize(mathml)
    assert _attributes(safe) == _attributes(mathml)
    assert _tags(safe) == _tags(mathml)


def _attributes(html: str) -> list[str]:
    return sorted(re.findall(r'\s([\w-]+)="', html))


def _tags(html: str) -> list[str]:
    return sorted(re.findall(r"<(\w+)", html))


def test_render_page_gives_each_block_its_html_and_boxes():
    page = StoredPage.model_validate(
        {
            "index": 0,
            "page": 4,
            "width": 1000,
            "height": 2000,
            "dpi": 144,
            "markdown": "# Results\n\n![](images/p0004_01.png)",
            "truncated": True,
            "truncated_reason": "max_tokens",
            "blocks": [
                {
                    "type": "title",
                    "bbox": [1, 2, 3, 4],
                    "bbox_norm": [0, 0, 1, 1],
                    "text": "Results\n  of the year",
                },
                {
                    "type": "image",
                    "bbox": [5, 6, 7, 8],
                    "bbox_norm": [1, 1, 2, 2],
                    "image": "images/p0004_01.png",
                },
                {
                    "type": "text",
                    "bbox": [0, 0, 9, 9],
                    "boxes": [[0, 0, 9, 4], [0, 5, 9, 9]],
                    "text": "two columns",
                },
                {"type": "image", "bbox": None, "bbox_norm": None, "image": "../../task.json"},
                {"type": 'x" onclick="y', "bbox": None, "text": "<b onclick=y>z</b>"},
            ],
        }
    )
    rendered = render_page(page)
    assert (rendered.page, rendered.index, rendered.width, rendered.height) == (4, 0, 1000, 2000)
    assert (rendered.truncated, rendered.truncated_reason) == (True, "max_tokens")
    assert rendered.markdown == page.markdown
    title, figure, columns, bad_figure, odd = rendered.blocks
    assert [b.index for b in rendered.blocks] == [0, 1, 2, 3, 4]
    assert title.html == "<h1>Results of the year</h1>"
    assert title.boxes == [[1, 2, 3, 4]]
    assert (figure.image, figure.html) == ("p0004_01.png", "")
    assert columns.boxes == [[0, 0, 9, 4], [0, 5, 9, 9]]
    assert (bad_figure.image, bad_figure.boxes, bad_figure.bbox) == (None, [], None)
    assert odd.type == 'x" onclick="y'  # a label is data: the console shows it as text
    assert odd.html == "<p><b>z</b></p>"
