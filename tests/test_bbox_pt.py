"""``bbox_pt``: layout boxes in PDF points, checked against PyMuPDF's own page and text positions.

Each page is a born-digital PDF page rendered by the pipeline's renderer; the "model output" boxes
every word where PyMuPDF says the word is drawn (on the model's 0-999 scale of the rendered page),
and the boxes that come back in points must land where PyMuPDF reports the words.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import pymupdf
import pytest

from app.documents import DocumentKind
from app.engines.base import END_MARKER
from app.pipeline.assemble import AssembledPage, assemble_page
from app.pipeline.grounding import parse_page
from app.pipeline.pages import open_document
from tests.documents import PICTURE_RECT, make_pdf, norm_box, png_bytes
from tests.servers import wait_for

WORDS = ["Quarterly", "revenue", "rose", "sharply"]


def _pdf(tmp_path: Path, *, rotate: int = 0, cropbox: pymupdf.Rect | None = None) -> Path:
    document = pymupdf.open()
    page = document.new_page(width=612, height=792)  # US Letter: not A4, not square
    page.insert_text((90, 130), " ".join(WORDS), fontsize=18)
    page.insert_text((300, 500), "Total 1,234", fontsize=11)
    if cropbox is not None:
        page.set_cropbox(cropbox)
    page.set_rotation(rotate)
    path = tmp_path / "page.pdf"
    document.save(path)
    document.close()
    return path


def _convert(
    path: Path, dpi: float, max_pixels: int = 50_000_000
) -> tuple[AssembledPage, list[pymupdf.Rect]]:
    """Box every word where PyMuPDF draws it on the rendered page, as the model would, and assemble.

    Returns the assembled page and each word's rectangle as PyMuPDF's ``get_text`` reports it.
    """
    with open_document(path, DocumentKind.PDF) as rendered:
        image = rendered.render(1, dpi=dpi, max_pixels=max_pixels)
    assert image.dpi is not None
    zoom = image.dpi / 72
    width, height = image.image.size
    with pymupdf.open(path) as document:
        page = document[0]
        words = [pymupdf.Rect(word[:4]) for word in page.get_text("words")]
        # get_text reports the unrotated page; the model sees the page as shown (rotated).
        shown = [rect * page.rotation_matrix for rect in words]
    # The model's 0-999 scale is of the image it was shown, in pixels.
    raw = "".join(
        f"<|ref|>text<|/ref|><|det|>[{norm_box(tuple(rect * zoom), (width, height))}]<|/det|>\nword {i}\n\n"
        for i, rect in enumerate(shown)
    )
    return assemble_page(image, parse_page(raw + END_MARKER), 0), words


def _assert_lands_on(box: list[float], rect: pymupdf.Rect, page: AssembledPage) -> None:
    # The model's scale rounds to 1/999 of the image's side (half of it either way), and the pixel
    # box is rounded outward by up to a pixel; 0.01 pt is bbox_pt's own rounding.
    pixel = 72 / page.layout["dpi"]
    slack_x = page.layout["width"] * pixel / 999 / 2 + pixel + 0.01
    slack_y = page.layout["height"] * pixel / 999 / 2 + pixel + 0.01
    for got, want, slack in zip(box, rect, (slack_x, slack_y, slack_x, slack_y), strict=True):
        assert abs(got - want) <= slack, (box, rect)


@pytest.mark.parametrize("dpi", [72, 100, 144, 200])
def test_boxes_in_points_are_where_pymupdf_reports_the_words(tmp_path: Path, dpi: float) -> None:
    page, words = _convert(_pdf(tmp_path), dpi)

    blocks = page.layout["blocks"]
    assert len(blocks) == len(words) == 6
    for block, rect in zip(blocks, words, strict=True):
        _assert_lands_on(block["bbox_pt"], rect, page)
    # The page in points is PyMuPDF's page.rect, to within a pixel.
    assert abs(page.layout["width"] * 72 / dpi - 612) <= 72 / dpi
    assert abs(page.layout["height"] * 72 / dpi - 792) <= 72 / dpi


def test_a_page_scaled_down_to_the_pixel_limit_still_gives_points(tmp_path: Path) -> None:
    page, words = _convert(_pdf(tmp_path), dpi=300, max_pixels=400_000)

    dpi = page.layout["dpi"]
    assert dpi < 100  # scaled down: the dpi the boxes are in is not the one asked for
    for block, rect in zip(page.layout["blocks"], words, strict=True):
        _assert_lands_on(block["bbox_pt"], rect, page)


def test_a_cropped_page_counts_points_from_its_visible_top_left(tmp_path: Path) -> None:
    page, words = _convert(_pdf(tmp_path, cropbox=pymupdf.Rect(50, 80, 450, 600)), dpi=144)

    assert [round(rect.x0) for rect in words][:1] == [40]  # PyMuPDF counts from the crop box too
    for block, rect in zip(page.layout["blocks"], words, strict=True):
        _assert_lands_on(block["bbox_pt"], rect, page)


def test_on_a_rotated_page_the_derotation_matrix_gives_pymupdfs_text_positions(tmp_path: Path) -> None:
    path = _pdf(tmp_path, rotate=90)
    page, words = _convert(path, dpi=144)

    assert (page.layout["width"], page.layout["height"]) == (1584, 1224)  # 792 x 612 pt, shown turned
    with pymupdf.open(path) as document:
        derotate = document[0].derotation_matrix
    for block, rect in zip(page.layout["blocks"], words, strict=True):
        _assert_lands_on(list(pymupdf.Rect(block["bbox_pt"]) * derotate), rect, page)


def test_an_image_document_has_no_points(tmp_path: Path) -> None:
    path = tmp_path / "scan.png"
    path.write_bytes(png_bytes((400, 300)))
    with open_document(path, DocumentKind.PNG) as rendered:
        image = rendered.render(1, dpi=144, max_pixels=50_000_000)
    raw = "<|ref|>text<|/ref|><|det|>[[100, 100, 500, 500]]<|/det|>\nA scan.\n\n" + END_MARKER

    page = assemble_page(image, parse_page(raw), 0)

    [block] = page.layout["blocks"]
    assert page.layout["dpi"] is None
    assert block["bbox"] == [40, 30, 201, 151]
    assert block["bbox_pt"] is None


def test_layout_json_and_result_json_carry_points(make_server: Callable[..., object]) -> None:
    picture = f"<|ref|>image<|/ref|><|det|>[{norm_box(PICTURE_RECT)}]<|/det|>\n"
    server = make_server(answers=[picture])
    client: httpx.Client = server.client  # type: ignore[attr-defined]
    response = client.post("/v1/tasks/upload", files={"file": ("one.pdf", make_pdf(1, picture_page=1))})
    task_id = response.json()["task_id"]

    def succeeded() -> dict[str, object] | None:
        view = client.get(f"/v1/tasks/{task_id}").json()
        return view if view["status"] in ("succeeded", "failed") else None

    assert wait_for(succeeded, timeout=120)["status"] == "succeeded"
    layout = client.get(f"/v1/tasks/{task_id}/layout.json").json()
    result = client.get(f"/v1/tasks/{task_id}/result.json").json()

    [from_layout] = layout["pages"][0]["blocks"]
    [from_result] = result["pages"][0]["blocks"]
    assert from_layout["bbox_pt"] == from_result["bbox_pt"]
    # At 144 dpi the A4 page is 1190 x 1684 pixels: half a unit of the 0-999 scale (at most 0.43
    # pt) plus a pixel of outward rounding (0.5 pt) from where the picture was drawn.
    for got, want in zip(from_layout["bbox_pt"], PICTURE_RECT, strict=True):
        assert abs(got - want) <= 0.94
