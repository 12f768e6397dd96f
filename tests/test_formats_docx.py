"""result.docx: read back with python-docx, and converted by LibreOffice to prove Word opens it."""

from __future__ import annotations

import io
import shutil
import subprocess

import docx
import pymupdf
import pytest
from docx.oxml.ns import qn

from app.formats import write_docx
from tests.test_formats_segments import (
    FIGURE_CAPTION,
    OUTLOOK,
    PARAGRAPH_1,
    RESULTS,
    TABLE_CAPTION,
    TITLE,
    Sample,
    build_sample,
)

SOFFICE = shutil.which("soffice")


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Sample:
    return build_sample(tmp_path_factory.mktemp("sample"))


@pytest.fixture(scope="module")
def written(sample: Sample) -> bytes:
    out = io.BytesIO()
    write_docx(sample.result, sample.crops, out)
    return out.getvalue()


@pytest.fixture(scope="module")
def word(written: bytes) -> docx.document.Document:
    return docx.Document(io.BytesIO(written))


@pytest.fixture(scope="module")
def converted(written: bytes, tmp_path_factory: pytest.TempPathFactory) -> pymupdf.Document:
    """The file as LibreOffice Writer reads it, exported to PDF (Debian: libreoffice-writer-nogui,
    and libreoffice-math-nogui for the equations)."""
    if SOFFICE is None:
        pytest.skip("LibreOffice (soffice) is not installed")
    folder = tmp_path_factory.mktemp("soffice")
    source = folder / "result.docx"
    source.write_bytes(written)
    done = subprocess.run(
        [
            SOFFICE,
            "--headless",
            "--norestore",
            f"-env:UserInstallation={(folder / 'profile').as_uri()}",  # never the user's profile
            "--convert-to",
            "pdf",
            "--outdir",
            str(folder),
            str(source),
        ],
        capture_output=True,
        timeout=120,
        check=False,
    )
    pdf = folder / "result.pdf"
    assert pdf.exists(), done.stderr.decode()
    return pymupdf.open(pdf)


def test_headings_and_paragraphs_keep_their_structure(word: docx.document.Document) -> None:
    headings = [(p.style.name, p.text) for p in word.paragraphs if p.style.name.startswith("Heading")]
    assert headings == [("Heading 1", TITLE), ("Heading 2", RESULTS), ("Heading 2", OUTLOOK)]
    texts = [p.text for p in word.paragraphs]
    assert PARAGRAPH_1 in texts
    assert "Note end." in texts  # the hostile footnote: its script and image are gone, not shown
    assert not any("pwned" in text for text in texts)
    assert word.core_properties.title == "report.pdf"


def test_tables_become_word_tables_with_merged_cells(word: docx.document.Document) -> None:
    [table] = word.tables
    assert [[cell.text for cell in row.cells] for row in table.rows] == [
        ["Revenue by year", "Revenue by year"],  # one cell spanning both columns
        ["Year", "Revenue"],
        ["2022", "1.1"],
        ["2023", "1.2"],
    ]
    header = table.rows[0].cells[0]
    assert header._tc.grid_span == 2
    assert all(run.bold for run in header.paragraphs[0].runs)
    captions = [p.text for p in word.paragraphs if p.style.name == "Caption"]
    assert captions == [FIGURE_CAPTION, TABLE_CAPTION]


def test_the_figure_is_embedded_with_its_caption(word: docx.document.Document, sample: Sample) -> None:
    [shape] = word.inline_shapes
    [crop] = sample.crops.values()
    blob = word.part.related_parts[shape._inline.graphic.graphicData.pic.blipFill.blip.embed].blob
    assert blob == crop
    # At its size on the page: the crop's pixels at the render's dpi.
    block = next(b for b in sample.result["pages"][0]["blocks"] if b["type"] == "image")
    width_inches = (block["bbox"][2] - block["bbox"][0]) / sample.result["pages"][0]["dpi"]
    assert abs(shape.width.inches - width_inches) < 0.01


def test_equations_are_office_math(word: docx.document.Document) -> None:
    body = word.element.body
    display = body.findall(".//" + qn("m:oMathPara"))
    inline = [m for m in body.iter(qn("m:oMath")) if m.getparent().tag == qn("w:p")]
    assert len(display) == 1
    assert len(inline) == 1
    [fraction] = display[0].iter(qn("m:f"))
    assert ["".join(arg.itertext()) for arg in fraction] == ["a", "b"]
    assert len(list(display[0].iter(qn("m:sSup")))) == 1
    assert len(list(inline[0].iter(qn("m:rad")))) == 1


def test_libreoffice_reads_it_all(converted: pymupdf.Document, sample: Sample) -> None:
    text = " ".join(page.get_text() for page in converted)
    words = " ".join(text.split())
    for expected in (TITLE, RESULTS, OUTLOOK, FIGURE_CAPTION, TABLE_CAPTION, "Revenue by year", "2023 1.2"):
        assert expected in words
    assert " ".join(PARAGRAPH_1.split()[:8]) in words
    # The equations came through as formulas (LibreOffice Math draws them as text too).
    assert "E=mc" in text.replace(" ", "")
    assert "√" in text
    images = [image for page in converted for image in page.get_images()]
    assert len(images) == 1
    [crop] = sample.crops.values()
    assert pymupdf.Pixmap(converted, images[0][0]).width == pymupdf.Pixmap(crop).width


@pytest.mark.parametrize(
    ("markdown", "expected"),
    [
        ("<div>" * 3000 + "deep" + "</div>" * 3000, "deep"),  # past libxml2's and Python's depth
        ('<table><tr><td colspan="99999" rowspan="99999">wide</td></tr></table>', "wide"),
        (
            "nul\x00 and vertical\x0btab and lone \ud800 surrogate",
            "vertical tab and lone \ufffd surrogate",  # the renderer makes \x00 U+FFFD, \x0b a space
        ),
        ("$" + "x^{" * 150 + "y" + "}" * 150 + "$", "y"),
    ],
)
def test_a_hostile_page_still_gives_a_file_with_its_text(markdown: str, expected: str) -> None:
    result = {
        "pages": [
            {"index": 0, "page": 1, "markdown": markdown, "blocks": [{"type": "text", "text": markdown}]}
        ]
    }
    out = io.BytesIO()

    write_docx(result, {}, out)

    word = docx.Document(io.BytesIO(out.getvalue()))
    texts = [p.text for p in word.paragraphs]
    texts += [cell.text for table in word.tables for row in table.rows for cell in row.cells]
    texts += [t.text or "" for t in word.element.body.iter(qn("m:t"))]  # Office Math runs
    assert any(expected in text for text in texts)
    if word.tables:
        assert len(word.tables[0].columns) <= 63  # Word's limit
        assert len(word.tables[0].rows) == 1


def test_a_missing_crop_leaves_its_caption(sample: Sample) -> None:
    out = io.BytesIO()

    write_docx(sample.result, lambda name: None, out)

    word = docx.Document(io.BytesIO(out.getvalue()))
    assert len(word.inline_shapes) == 0
    assert FIGURE_CAPTION in [p.text for p in word.paragraphs if p.style.name == "Caption"]
