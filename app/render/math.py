"""LaTeX to MathML, for the math the model writes as ``\\( \\)``, ``\\[ \\]`` and ``$ $``.

Chromium, Firefox and Safari render MathML natively, so the console needs no script for math. The
MathML built here is NOT safe yet: latex2mathml copies text such as ``\\text{<b>}`` and
``\\href{...}`` into the output unescaped, so it must go through ``app.render.sanitize`` like all
other HTML.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable, Sequence

from latex2mathml.converter import convert
from markdown_it import MarkdownIt
from markdown_it.renderer import RendererHTML
from markdown_it.token import Token
from markdown_it.utils import EnvType, OptionsDict
from mdit_py_plugins.dollarmath import dollarmath_plugin
from mdit_py_plugins.texmath import texmath_plugin

# The token types the two plugins emit, and whether each is display (block) math.
_MATH_TOKENS = {
    "math_inline": False,
    "math_inline_double": True,
    "math_block": True,
    "math_block_eqno": True,
    "math_block_label": True,
}
# ``\( \)`` and ``\[ \]`` inside raw HTML (table cells), which Markdown leaves alone; no ``<``
# between the delimiters, so a match never spans two cells or a tag.
_HTML_MATH = re.compile(r"\\\((?P<inline>[^<]+?)\\\)|\\\[(?P<display>[^<]+?)\\\]")

RenderRule = Callable[[RendererHTML, Sequence[Token], int, OptionsDict, EnvType], str]


def latex_to_mathml(latex: str, *, display: bool) -> str:
    """``latex`` as a ``<math>`` element; LaTeX that does not parse comes back as escaped ``<code>``.

    The result still needs sanitising (see the module docstring).
    """
    try:
        return convert(latex.strip(), display="block" if display else "inline")
    # latex2mathml raises its own errors and plain IndexError/KeyError alike on malformed input;
    # any failure has the same cure: show the source the model wrote.
    except Exception:
        return f"<code>{html.escape(latex)}</code>"


def math_plugin(md: MarkdownIt) -> None:
    """Parse ``$..$``, ``$$..$$``, ``\\(..\\)`` and ``\\[..\\]`` and render them as MathML.

    A lone ``$`` next to a space or digit is not math ("costs $5 and $6"), as in Pandoc.
    """
    md.use(dollarmath_plugin, allow_labels=False, allow_space=False, allow_digits=False, double_inline=True)
    md.use(texmath_plugin, delimiters="brackets")
    for token_type, display in _MATH_TOKENS.items():
        md.add_render_rule(token_type, _math_rule(display))
    md.add_render_rule("html_block", _html_with_math)
    md.add_render_rule("html_inline", _html_with_math)


def math_in_html(raw: str) -> str:
    """Raw HTML with each ``\\(..\\)`` and ``\\[..\\]`` in its text replaced by MathML."""

    def replace(match: re.Match[str]) -> str:
        display = match.group("display") is not None
        latex = html.unescape(match.group("display") if display else match.group("inline"))
        return latex_to_mathml(latex, display=display)

    return _HTML_MATH.sub(replace, raw)


def _math_rule(display: bool) -> RenderRule:
    def render(
        self: RendererHTML, tokens: Sequence[Token], idx: int, options: OptionsDict, env: EnvType
    ) -> str:
        mathml = latex_to_mathml(tokens[idx].content, display=display)
        return f"{mathml}\n" if tokens[idx].block else mathml

    return render


def _html_with_math(
    self: RendererHTML, tokens: Sequence[Token], idx: int, options: OptionsDict, env: EnvType
) -> str:
    return math_in_html(tokens[idx].content)
