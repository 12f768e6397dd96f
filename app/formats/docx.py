"""A result as a Word document (.docx), written with python-docx.

Titles and sub-titles become Word headings; text keeps its paragraphs, lists, emphasis and links;
tables become Word tables (merged cells included); LaTeX becomes Office Math (``app.formats.omml``),
inline or as a display equation; figures are embedded at their size on the page, with their caption
in Word's Caption style.

Every block goes through the console's Markdown renderer and sanitiser first
(``app.render.markdown_to_html``), so only its small, known set of elements has to be mapped to
Word, and nothing a page said in raw HTML reaches the file except as text.
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from html.parser import HTMLParser
from typing import IO, Any, Protocol

import lxml.html
from docx import Document as new_document
from docx.document import Document as WordDocument
from docx.enum.text import WD_ALIGN_PARAGRAPH
from docx.image.exceptions import InvalidImageStreamError, UnexpectedEndOfFileError, UnrecognizedImageError
from docx.opc.constants import RELATIONSHIP_TYPE
from docx.oxml import OxmlElement
from docx.oxml.ns import qn
from docx.shared import Emu, Inches, RGBColor
from docx.table import Table, _Cell
from docx.text.paragraph import Paragraph
from docx.text.run import Run
from lxml import etree

from app.formats.figures import ImageSource, load_image
from app.formats.omml import to_omml, xml_text
from app.formats.segments import Document, Unit, heading_text, read_document, units
from app.render import markdown_to_html

_HEADING = re.compile(r"^h([1-6])$")
_BLOCKS = {"p", "div", "blockquote", "pre", "ul", "ol", "dl", "dt", "dd", "li", "table", "hr"}
_BLOCKS |= {f"h{level}" for level in range(1, 7)}
_SPACES = re.compile(r"\s+")
_MAX_COLUMNS = 63  # Word's limit on a table's columns
_MAX_SPAN = 1000  # rows a cell may span; a crafted rowspan cannot make a huge table
# Elements nested deeper than this are written as plain text: the writer recurses (a few frames a
# level) and Python stops at 1,000 frames. Real pages nest a dozen deep (a formula in a table).
_MAX_DEPTH = 100
_DEFAULT_DPI = 96  # for figures of image documents, whose pages have no dpi
_MONOSPACE = "Courier New"
_CAPTIONS = {"table_caption", "table_footnote", "image_caption"}
_LINK_BLUE = RGBColor(0x05, 0x63, 0xC1)


class _Container(Protocol):
    """What holds paragraphs and tables: the document body or a table cell."""

    def add_paragraph(self, text: str = "", style: str | None = None) -> Paragraph: ...

    def add_table(self, rows: int, cols: int) -> Table: ...


@dataclass(frozen=True)
class _Format:
    """Character formatting in force for the text being written."""

    bold: bool = False
    italic: bool = False
    underline: bool = False
    strike: bool = False
    subscript: bool = False
    superscript: bool = False
    code: bool = False
    link: bool = False


_PLAIN = _Format()
_INLINE = {
    "strong": {"bold": True},
    "b": {"bold": True},
    "em": {"italic": True},
    "i": {"italic": True},
    "u": {"underline": True},
    "ins": {"underline": True},
    "s": {"strike": True},
    "del": {"strike": True},
    "sub": {"subscript": True},
    "sup": {"superscript": True},
    "code": {"code": True},
}


def write_docx(
    result: Mapping[str, Any], images: ImageSource, out: IO[bytes], *, title: str | None = None
) -> None:
    """Write the document of a parsed ``result.json`` to ``out`` as .docx.

    ``title`` (the file's title property) defaults to the source's file name. A crop ``images`` does
    not have is left out; its caption stays. The whole document is built in memory before it is
    written (python-docx keeps it as one XML tree). CPU work: run it in a thread.
    """
    document = read_document(result)
    word = new_document()
    word.core_properties.title = xml_text(title or _source_name(result))
    word.core_properties.author = "dsocr-server"
    writer = _Writer(word, document, images)
    for unit in units(document):
        writer.unit(unit)
    word.save(out)


def _source_name(result: Mapping[str, Any]) -> str:
    source = result.get("source")
    name = source.get("filename") if isinstance(source, Mapping) else None
    return name if isinstance(name, str) else ""


class _Writer:
    def __init__(self, word: WordDocument, document: Document, images: ImageSource) -> None:
        self._word = word
        self._doc = document
        self._images = images
        # One parser per document (lxml parsers are not for sharing between threads); huge_tree,
        # or libxml2 silently drops whatever is nested deeper than 256 elements.
        self._parser = lxml.html.HTMLParser(huge_tree=True)
        section = word.sections[0]
        self._text_width = Emu(
            (section.page_width or Inches(8.5)) - (section.left_margin or 0) - (section.right_margin or 0)
        )

    def unit(self, unit: Unit) -> None:
        if unit.kind == "heading":
            text = heading_text(self._doc.text(unit.segments[0]))
            self._word.add_heading(xml_text(text), level=min(unit.level, 9))
        elif unit.kind == "figure":
            self._figure(unit)
        else:
            for segment in unit.segments:
                style = "Caption" if segment.type in _CAPTIONS else None
                self._html(self._word, markdown_to_html(self._doc.text(segment)), style=style)

    def _figure(self, unit: Unit) -> None:
        for link in unit.links:
            loaded = load_image(self._images, link.image_name or "")
            if loaded is None:
                continue
            data, _ = loaded
            paragraph = self._word.add_paragraph()
            paragraph.alignment = WD_ALIGN_PARAGRAPH.CENTER
            block = link.page.blocks[link.block] if link.block is not None else None
            width = self._figure_width(block.bbox if block else None, link.page.dpi)
            try:
                paragraph.add_run().add_picture(io.BytesIO(data), width=width)
            except (UnrecognizedImageError, InvalidImageStreamError, UnexpectedEndOfFileError):
                # A damaged crop: the figure is left out, its caption stays.
                paragraph._p.getparent().remove(paragraph._p)
        caption = "\n\n".join(self._doc.text(segment) for segment in unit.captions)
        if caption:
            self._html(self._word, markdown_to_html(caption), style="Caption")

    def _figure_width(self, bbox: list[int] | None, dpi: float | None) -> Emu | None:
        """The crop's width on the page it came from, at most the text's width."""
        if not bbox:
            return None
        inches = (bbox[2] - bbox[0]) / (dpi or _DEFAULT_DPI)
        return Emu(min(int(Inches(inches)), int(self._text_width)))

    # --- HTML (the sanitiser's small set of elements) to Word ---------------------------------------

    def _html(self, container: _Container, html: str, style: str | None = None) -> None:
        if not html.strip():
            return
        root = lxml.html.fragment_fromstring(html, create_parent="div", parser=self._parser)
        if _depth(root) > _MAX_DEPTH:
            # Nesting no document needs (a page of 5,000 <div>s): its text, a paragraph a line,
            # read from the HTML itself (libxml2 drops what is nested past about 2,000 elements).
            reader = _TextReader()
            reader.feed(html)
            reader.close()
            for line in "".join(reader.parts).split("\n"):
                if line.strip():
                    container.add_paragraph(xml_text(_collapse(line).strip()), style=style)
            return
        self._flow(container, root, style)

    def _flow(
        self,
        container: _Container,
        element: etree._Element,
        style: str | None,
        paragraph: Paragraph | None = None,
        fmt: _Format = _PLAIN,
        prefix: str = "",
    ) -> None:
        """Write ``element``'s content: inline runs gather into paragraphs, block children make their
        own. ``paragraph``, when given, takes the first inline content; ``prefix`` (a list item's
        number) starts the first paragraph written."""
        current = paragraph
        fresh = paragraph is None or not paragraph.runs

        def open_paragraph() -> Paragraph:
            nonlocal current, prefix
            if current is None:
                current = container.add_paragraph(style=style)
            if prefix:
                self._text(current, prefix, fmt)
                prefix = ""
            return current

        def add_text(raw: str | None) -> None:
            nonlocal fresh
            # HTML's whitespace rule: a run of whitespace is one space, and none between blocks or
            # at the start of a paragraph.
            text = _SPACES.sub(" ", raw or "")
            if fresh or current is None:
                text = text.lstrip()
            if text:
                self._text(open_paragraph(), text, fmt)
                fresh = False

        add_text(element.text)
        for child in element:
            if not isinstance(child.tag, str):
                pass
            elif _is_block(child):
                if prefix and child.tag in ("p", "div") and current is None:
                    # A loose list item's first paragraph takes its number.
                    self._flow(container, child, style, fmt=fmt, prefix=prefix)
                    prefix = ""
                else:
                    if prefix:
                        open_paragraph()
                    self._block(container, child, style, fmt)
                current, fresh = None, True
            else:
                self._inline(open_paragraph(), child, fmt)
                fresh = False
            add_text(child.tail)

    def _block(self, container: _Container, element: etree._Element, style: str | None, fmt: _Format) -> None:
        tag = str(element.tag)
        heading = _HEADING.match(tag)
        if heading:
            self._flow(container, element, f"Heading {heading.group(1)}", fmt=fmt)
        elif tag in ("p", "div", "dd", "li"):
            self._flow(container, element, style, fmt=fmt)
        elif tag == "dt":
            self._flow(container, element, style, fmt=replace(fmt, bold=True))
        elif tag == "blockquote":
            self._flow(container, element, "Quote", fmt=fmt)
        elif tag == "pre":
            paragraph = container.add_paragraph(style=style)
            lines = "".join(element.itertext()).rstrip("\n").split("\n")
            for i, line in enumerate(lines):
                run = self._text(paragraph, line, replace(fmt, code=True))
                if i < len(lines) - 1:
                    run.add_break()
        elif tag in ("ul", "ol"):
            self._list(container, element, fmt, depth=_list_depth(element))
        elif tag == "dl":
            self._flow(container, element, style, fmt=fmt)
        elif tag == "table":
            self._table(container, element)
        elif tag == "hr":
            _rule(container.add_paragraph(style=style))
        elif tag == "math":
            paragraph = container.add_paragraph(style=style)
            paragraph.alignment = WD_ALIGN_PARAGRAPH.CENTER
            para = OxmlElement("m:oMathPara")
            para.append(to_omml(element))
            paragraph._p.append(para)

    def _list(self, container: _Container, element: etree._Element, fmt: _Format, depth: int) -> None:
        ordered = element.tag == "ol"
        try:
            number = int(element.get("start", "1"))
        except ValueError:
            number = 1
        level = "" if depth <= 1 else f" {min(depth, 3)}"
        # Numbered lists carry their numbers as text: Word's automatic numbering would continue
        # from one list to the next unless each got its own numbering definition.
        style = "List Paragraph" if ordered else f"List Bullet{level}"
        for item in element:
            if not isinstance(item.tag, str) or item.tag != "li":
                continue
            self._flow(container, item, style, fmt=fmt, prefix=f"{number}. " if ordered else "")
            number += 1

    def _inline(self, paragraph: Paragraph, element: etree._Element, fmt: _Format) -> None:
        tag = str(element.tag)
        if tag == "br":
            paragraph.add_run().add_break()
        elif tag == "math":
            paragraph._p.append(to_omml(element))
        elif tag == "a" and (href := element.get("href")):
            start = len(paragraph._p)
            self._runs(paragraph, element, replace(fmt, link=True))
            _hyperlink(paragraph, href, start)
        else:
            self._runs(paragraph, element, replace(fmt, **_INLINE.get(tag, {})))

    def _runs(self, paragraph: Paragraph, element: etree._Element, fmt: _Format) -> None:
        if element.text:
            self._text(paragraph, _collapse(element.text), fmt)
        for child in element:
            if isinstance(child.tag, str):
                if _is_block(child):
                    # A block inside inline content (the sanitiser keeps such nesting): its text.
                    self._text(paragraph, " ".join(child.itertext()), fmt)
                else:
                    self._inline(paragraph, child, fmt)
            if child.tail:
                self._text(paragraph, _collapse(child.tail), fmt)

    def _text(self, paragraph: Paragraph, text: str, fmt: _Format) -> Run:
        run = paragraph.add_run(xml_text(text))
        run.bold = fmt.bold or None
        run.italic = fmt.italic or None
        run.underline = (fmt.underline or fmt.link) or None
        run.font.strike = fmt.strike or None
        run.font.subscript = fmt.subscript or None
        run.font.superscript = fmt.superscript or None
        if fmt.code:
            run.font.name = _MONOSPACE
        if fmt.link:
            run.font.color.rgb = _LINK_BLUE
        return run

    def _table(self, container: _Container, element: etree._Element) -> None:
        rows = [row for row in element.iter("tr") if _owner_table(row) is element]
        caption = next((c for c in element if c.tag == "caption"), None)
        if caption is not None:
            self._flow(container, caption, "Caption")
        grid = _grid(rows)
        if not grid:
            return
        height = max(r + rs for r, _, rs, _, _ in grid)
        width = max(c + cs for _, c, _, cs, _ in grid)
        table = container.add_table(rows=height, cols=width)
        table.style = self._word.styles["Table Grid"]
        for r, c, row_span, col_span, cell_element in grid:
            cell: _Cell = table.cell(r, c)
            if row_span > 1 or col_span > 1:
                cell = cell.merge(table.cell(r + row_span - 1, c + col_span - 1))
            header = replace(_PLAIN, bold=cell_element.tag == "th")
            self._flow(cell, cell_element, None, paragraph=cell.paragraphs[0], fmt=header)


def _grid(rows: list[etree._Element]) -> list[tuple[int, int, int, int, etree._Element]]:
    """Each cell's (row, column, rows spanned, columns spanned, element), spans clipped to free space."""
    taken: set[tuple[int, int]] = set()
    placed: list[tuple[int, int, int, int, etree._Element]] = []
    for r, row in enumerate(rows):
        c = 0
        for cell in row:
            if not isinstance(cell.tag, str) or cell.tag not in ("td", "th"):
                continue
            while (r, c) in taken:
                c += 1
            if c >= _MAX_COLUMNS:
                break
            col_span = min(_span(cell, "colspan"), _MAX_COLUMNS - c)
            row_span = min(_span(cell, "rowspan"), len(rows) - r, _MAX_SPAN)
            # A malformed table's spans may collide; shrink them instead of overlapping a cell.
            while col_span > 1 and (r, c + col_span - 1) in taken:
                col_span -= 1
            while row_span > 1 and any((r + row_span - 1, c + i) in taken for i in range(col_span)):
                row_span -= 1
            taken.update((r + i, c + j) for i in range(row_span) for j in range(col_span))
            placed.append((r, c, row_span, col_span, cell))
            c += col_span
    return placed


def _span(cell: etree._Element, name: str) -> int:
    try:
        return max(1, int(cell.get(name, "1")))
    except ValueError:
        return 1


def _owner_table(element: etree._Element) -> etree._Element | None:
    parent = element.getparent()
    while parent is not None and parent.tag != "table":
        parent = parent.getparent()
    return parent


def _list_depth(element: etree._Element) -> int:
    depth, parent = 1, element.getparent()
    while parent is not None:
        depth += parent.tag in ("ul", "ol")
        parent = parent.getparent()
    return depth


class _TextReader(HTMLParser):
    """The text of an HTML fragment, a line break at each block element; any depth."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _BLOCKS or tag in ("br", "tr", "math"):
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        self.parts.append(data)


def _depth(root: etree._Element) -> int:
    """How deep elements nest under ``root`` (walked without recursion)."""
    depth = deepest = 0
    for event, _ in etree.iterwalk(root, events=("start", "end")):
        depth += 1 if event == "start" else -1
        deepest = max(deepest, depth)
    return deepest


def _is_block(element: etree._Element) -> bool:
    return element.tag in _BLOCKS or (element.tag == "math" and element.get("display") == "block")


def _collapse(text: str) -> str:
    """HTML's whitespace rule inside a line of text: a run of whitespace is one space."""
    return _SPACES.sub(" ", text)


def _hyperlink(paragraph: Paragraph, href: str, start: int) -> None:
    """Wrap the runs added to ``paragraph`` since child ``start`` in a link to ``href``."""
    r_id = paragraph.part.relate_to(href, RELATIONSHIP_TYPE.HYPERLINK, is_external=True)
    link = OxmlElement("w:hyperlink")
    link.set(qn("r:id"), r_id)
    for run in list(paragraph._p)[start:]:
        if run.tag == qn("w:r"):
            link.append(run)
    paragraph._p.insert(start, link)


def _rule(paragraph: Paragraph) -> None:
    """A horizontal rule: the paragraph's bottom border."""
    borders = OxmlElement("w:pBdr")
    bottom = OxmlElement("w:bottom")
    for name, value in (("w:val", "single"), ("w:sz", "6"), ("w:space", "1"), ("w:color", "auto")):
        bottom.set(qn(name), value)
    borders.append(bottom)
    paragraph._p.get_or_add_pPr().append(borders)
