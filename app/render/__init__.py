"""Model output made safe to show in a browser: Markdown and LaTeX to sanitised HTML and MathML.

Public names: ``markdown_to_html`` (one Markdown text to safe HTML) and ``render_page`` (one page
of ``result.json`` to its blocks' safe HTML, as the web console shows them).
"""

from app.render.html import markdown_to_html
from app.render.page import RenderedBlock, RenderedPage, render_page

__all__ = ["RenderedBlock", "RenderedPage", "markdown_to_html", "render_page"]
