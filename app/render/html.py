"""Markdown as DeepSeek-OCR writes it (CommonMark, raw HTML tables, LaTeX) to safe HTML."""

from __future__ import annotations

import functools

from markdown_it import MarkdownIt

from app.render.math import math_plugin
from app.render.sanitize import sanitize


@functools.cache
def _parser() -> MarkdownIt:
    # Raw HTML is allowed in: the model writes tables as <table>. It is sanitised after rendering,
    # never trusted. One parser for the process: its rules are fixed here and a render keeps its
    # state in local variables, so threads can share it.
    return MarkdownIt("commonmark", {"html": True}).enable(["table", "strikethrough"]).use(math_plugin)


def markdown_to_html(markdown: str) -> str:
    """``markdown`` rendered to HTML that is safe to insert into a page: tables as tables, LaTeX as
    MathML, and nothing that can run script, load a resource or style the page
    (see ``app.render.sanitize``)."""
    return sanitize(_parser().render(markdown)).strip()
