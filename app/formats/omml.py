"""MathML (as ``latex2mathml`` writes it) to Office Math (OMML), so Word shows real equations.

Covers what LaTeX in documents uses: tokens, rows, scripts, fractions, roots, limits and accents,
matrices. Anything else keeps its content as a plain row, so no symbol is ever lost; only
``annotation`` (the LaTeX source) and ``mphantom`` (invisible by definition) are dropped. Element
names follow ECMA-376 Part 1, section 22.1 (Math).
"""

from __future__ import annotations

import re

from docx.oxml import OxmlElement
from docx.oxml.ns import qn
from lxml import etree

# Characters XML 1.0 forbids (python-docx refuses them); model output may hold any of them.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff\ud800-\udfff]")
_TOKENS = {"mi", "mn", "mo", "mtext", "ms"}
_ROWS = {
    "math",
    "mrow",
    "mstyle",
    "mpadded",
    "semantics",
    "menclose",
    "merror",
    "mmultiscripts",
    "mprescripts",
}
_DROPPED = {"annotation", "annotation-xml", "mphantom", "none"}
# (OMML element, the argument element each MathML child goes into, in order)
_SCRIPTS = {
    "msup": ("m:sSup", ("m:e", "m:sup")),
    "msub": ("m:sSub", ("m:e", "m:sub")),
    "msubsup": ("m:sSubSup", ("m:e", "m:sub", "m:sup")),
    "mfrac": ("m:f", ("m:num", "m:den")),
    "munder": ("m:limLow", ("m:e", "m:lim")),
    "mover": ("m:limUpp", ("m:e", "m:lim")),
}


def xml_text(text: str) -> str:
    """``text`` without the characters XML 1.0 cannot hold."""
    return _NOT_XML.sub("", text)


def to_omml(math: etree._Element) -> etree._Element:
    """An ``m:oMath`` element holding the equation of a MathML ``<math>`` element."""
    o_math = OxmlElement("m:oMath")
    _content(o_math, math)
    return o_math


def _content(parent: etree._Element, element: etree._Element) -> None:
    """Append the OMML of ``element``'s children to ``parent``."""
    for child in element:
        if isinstance(child.tag, str):
            _node(parent, child)


def _node(parent: etree._Element, element: etree._Element) -> None:
    tag = str(element.tag).lower()
    children = [child for child in element if isinstance(child.tag, str)]
    if tag in _DROPPED:
        return
    if tag in _TOKENS:
        _run(parent, element)
    elif tag in _SCRIPTS and len(children) == len(_SCRIPTS[tag][1]):
        name, slots = _SCRIPTS[tag]
        if tag == "mover" and element.get("accent") == "true" and _is_single_operator(children[1]):
            _accent(parent, children[0], "".join(children[1].itertext()))
            return
        node = _child(parent, name)
        if tag == "mfrac" and element.get("linethickness") in ("0", "0pt", "0px"):
            _child(_child(node, "m:fPr"), "m:type").set(qn("m:val"), "noBar")
        for slot, child in zip(slots, children, strict=True):
            _node(_child(node, slot), child)
    elif tag == "munderover" and len(children) == 3:
        upper = _child(parent, "m:limUpp")
        lower = _child(_child(upper, "m:e"), "m:limLow")
        _node(_child(lower, "m:e"), children[0])
        _node(_child(lower, "m:lim"), children[1])
        _node(_child(upper, "m:lim"), children[2])
    elif tag == "msqrt":
        radical = _child(parent, "m:rad")
        _child(_child(radical, "m:radPr"), "m:degHide").set(qn("m:val"), "1")
        _child(radical, "m:deg")
        _content(_child(radical, "m:e"), element)
    elif tag == "mroot" and len(children) == 2:
        radical = _child(parent, "m:rad")
        _node(_child(radical, "m:deg"), children[1])
        _node(_child(radical, "m:e"), children[0])
    elif tag == "mtable":
        matrix = _child(parent, "m:m")
        for row in children:
            matrix_row = _child(matrix, "m:mr")
            for cell in (c for c in row if isinstance(c.tag, str)):
                _content(_child(matrix_row, "m:e"), cell)
    elif tag == "mspace":
        _text_run(parent, " ", plain=True)
    else:
        # A row, or a structure with the wrong number of arguments: its content in order.
        if element.text and element.text.strip() and tag not in _ROWS:
            _text_run(parent, element.text, plain=True)
        _content(parent, element)


def _run(parent: etree._Element, token: etree._Element) -> None:
    text = "".join(token.itertext())
    if not text:
        return
    tag = str(token.tag).lower()
    variant = token.get("mathvariant")
    # Word sets single-letter identifiers in italic and everything else upright by default; a
    # function name (sin, log) or an explicit variant needs saying.
    plain = (
        tag in ("mtext", "ms") or variant == "normal" or (tag == "mi" and len(text) > 1 and variant is None)
    )
    style = {"bold": "b", "bold-italic": "bi", "italic": "i"}.get(variant or "")
    _text_run(parent, text, plain=plain, style=style)


def _text_run(parent: etree._Element, text: str, *, plain: bool, style: str | None = None) -> None:
    run = _child(parent, "m:r")
    if plain or style:
        _child(_child(run, "m:rPr"), "m:sty").set(qn("m:val"), style or "p")
    t = _child(run, "m:t")
    t.set(qn("xml:space"), "preserve")
    t.text = xml_text(text)


def _accent(parent: etree._Element, base: etree._Element, mark: str) -> None:
    accent = _child(parent, "m:acc")
    _child(_child(accent, "m:accPr"), "m:chr").set(qn("m:val"), xml_text(mark)[:1] or "\u0302")
    _node(_child(accent, "m:e"), base)


def _is_single_operator(element: etree._Element) -> bool:
    return str(element.tag).lower() == "mo" and len("".join(element.itertext())) == 1


def _child(parent: etree._Element, tag: str) -> etree._Element:
    element = OxmlElement(tag)
    parent.append(element)
    return element
