"""The allowlist that makes rendered model output safe to insert into the console's page.

Model output is untrusted: a scanned page can say ``<script>``, and the model copies it. Everything
the console shows as HTML passes ``sanitize``; everything else is shown as text.
"""

from __future__ import annotations

import nh3

_TEXT_TAGS = {
    "p", "br", "hr", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "pre", "code",
    "em", "strong", "b", "i", "u", "s", "del", "ins", "sub", "sup", "small", "mark", "span",
    "ul", "ol", "li", "dl", "dt", "dd", "a", "div",
}  # fmt: skip
_TABLE_TAGS = {"table", "caption", "colgroup", "col", "thead", "tbody", "tfoot", "tr", "th", "td"}
# MathML Core, as latex2mathml writes it.
_MATH_TAGS = {
    "math", "mrow", "mi", "mn", "mo", "ms", "mtext", "mspace", "msub", "msup", "msubsup", "munder",
    "mover", "munderover", "mfrac", "msqrt", "mroot", "mstyle", "mpadded", "mphantom", "menclose",
    "mtable", "mtr", "mtd", "mmultiscripts", "mprescripts", "none", "semantics", "annotation", "merror",
}  # fmt: skip
TAGS = _TEXT_TAGS | _TABLE_TAGS | _MATH_TAGS

_MATH_PRESENTATION = {"mathvariant", "mathsize", "mathcolor", "mathbackground", "displaystyle", "scriptlevel"}
_CELL = {"colspan", "rowspan", "align", "valign"}
# No style, id, class or event handler anywhere: no CSS (the page's CSP forbids inline styles
# anyway), no clobbering of the console's own elements, no script.
ATTRIBUTES: dict[str, set[str]] = {
    "a": {"href", "title"},
    "ol": {"start"},
    "td": _CELL,
    "th": _CELL | {"scope"},
    "col": {"span"},
    "colgroup": {"span"},
    "math": {"display", "xmlns"} | _MATH_PRESENTATION,
    "mstyle": _MATH_PRESENTATION,
    "mi": _MATH_PRESENTATION,
    "mn": _MATH_PRESENTATION,
    "mtext": _MATH_PRESENTATION,
    "mo": _MATH_PRESENTATION
    | {"stretchy", "fence", "separator", "form", "lspace", "rspace", "minsize", "maxsize", "largeop"}
    | {"movablelimits", "symmetric", "accent"},
    "mspace": {"width", "height", "depth", "linebreak", "mathbackground"},
    "mfrac": {"linethickness"},
    "mover": {"accent"},
    "munder": {"accentunder"},
    "munderover": {"accent", "accentunder"},
    "mpadded": {"width", "height", "depth", "lspace", "voffset"},
    "menclose": {"notation"},
    "mtable": {"columnalign", "rowalign", "columnspacing", "rowspacing", "columnlines", "rowlines", "frame"},
    "mtr": {"columnalign", "rowalign"},
    "mtd": {"columnalign", "rowalign", "columnspan", "rowspan"},
}
URL_SCHEMES = {"http", "https", "mailto"}


def sanitize(html: str) -> str:
    """``html`` reduced to the allowlist: text, headings, lists, tables, links and MathML.

    Removes scripts and styles with their content, event handlers and every attribute not listed,
    images (a remote ``src`` would tell a third party who reads the document), and links other
    than absolute http(s) and mailto ones. Links that stay open in a new tab without a referrer.
    """
    return nh3.clean(
        html,
        tags=TAGS,
        attributes=ATTRIBUTES,
        url_schemes=URL_SCHEMES,
        url_relative="deny",  # relative to /ui/, a model's "images/x.png" would only ever be a 404
        link_rel="noopener noreferrer",
        set_tag_attribute_values={"a": {"target": "_blank"}},
        strip_comments=True,
    )
