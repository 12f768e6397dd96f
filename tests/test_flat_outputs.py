"""Result files streamed from pages spooled to disk, and pages encoded once in the render processes.

The result files must be byte for byte what building them whole gave (``merge_markdown`` and
``json.dumps`` of the whole document); a resumed task must end with the same files; the engine must
be sent exactly the rendered pixels (the PNG as it is, or decoded for an engine in the service's
process), crops must be cut from them, and previews must still come as WebP.
"""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pymupdf
import pytest
from PIL import Image

from app.documents import DocumentKind
from app.engines.base import END_MARKER, PageText, RecognizeOptions
from app.engines.manager import Engine, ModelManager
from app.engines.vllm import RemoteEngine
from app.errors import EngineError
from app.metrics import Metrics
from app.pipeline.assemble import AssembledPage, merge_markdown
from app.pipeline.outputs import AssembledPages
from app.pipeline.pages import render_pages
from app.pipeline.run import PageJob, PagePipeline
from app.records import TaskRecord
from app.storage.local import LocalStore
from tests.openai_servers import FULL_GROUNDED_PAGE, VllmStandIn, full_page_answer, request_image
from tests.standins import StandInGpu

OPTIONS = RecognizeOptions(
    prompt="<|grounding|>Convert the document to markdown.",
    base_size=1024,
    image_size=640,
    crop_mode=True,
    max_new_tokens=99,
    timeout_seconds=99,
)


def _page(index: int, markdown: str, *, crops: int = 0) -> AssembledPage:
    blocks = [
        {
            "type": "text",
            "bbox": [1, 2, 30, 40],
            "bbox_norm": [1, 2, 3, 4],
            "bbox_pt": [0.5, 1.0, 15.25, 20.0],
        },
        {"type": "table", "bbox": None, "bbox_norm": None, "bbox_pt": None, "text": "<table>é\n</table>"},
    ]
    return AssembledPage(
        index=index,
        number=index + 3,
        markdown=markdown,
        layout={
            "index": index,
            "page": index + 3,
            "width": 100,
            "height": 141,
            "dpi": 144.0 if index % 2 else None,
            "truncated": index == 1,
            "truncated_reason": "max_tokens" if index == 1 else None,
            "blocks": blocks,
        },
        crops=[(f"p{index + 3:04d}_{n:02d}.png", b"\x89PNG") for n in range(1, crops + 1)],
        truncated=index == 1,
        truncated_reason="max_tokens" if index == 1 else None,
    )


PAGES = [
    _page(0, "# Title\n\nCafé \u2028 «text»\n"),
    _page(1, "   \n"),  # a page without Markdown leaves no run of blank lines
    _page(2, "![](images/p0005_01.png)\n\nline\r\nbreak", crops=2),
    _page(3, ""),
]


def _whole_result(view: dict[str, Any], pages: list[AssembledPage]) -> bytes:
    """result.json as the worker built it whole before it was streamed."""
    view = dict(view)
    view["pages"] = [
        {
            "index": p.index,
            "page": p.number,
            "markdown": p.markdown,
            "truncated": p.truncated,
            "truncated_reason": p.truncated_reason,
            **{k: p.layout[k] for k in ("width", "height", "dpi")},
            "blocks": p.layout["blocks"],
        }
        for p in pages
    ]
    return json.dumps(view, ensure_ascii=False).encode()


@pytest.mark.parametrize("count", [0, 1, len(PAGES)])
def test_streamed_result_files_are_byte_identical_to_the_whole(count: int) -> None:
    pages = PAGES[:count]
    view = {"task_id": "t", "status": "succeeded", "pages": [3, 4], "model": "m", "error": None}
    with AssembledPages() as spooled:
        for page in pages:
            spooled.add(page)
        assert b"".join(spooled.markdown_chunks()) == merge_markdown(pages).encode()
        layout = json.dumps({"version": 1, "pages": [p.layout for p in pages]}, ensure_ascii=False)
        assert b"".join(spooled.layout_chunks()) == layout.encode()
        assert b"".join(spooled.result_chunks(view)) == _whole_result(view, pages)
        # A view without "pages" gets them last, as assigning the key did.
        bare = {"task_id": "t"}
        assert b"".join(spooled.result_chunks(bare)) == _whole_result(bare, pages)
        assert spooled.images == [name for page in pages for name, _ in page.crops]
        assert [p.number for p in spooled] == [p.number for p in pages]


def _pdf(path: Path, pages: int) -> Path:
    """Text pages, and one with a blue picture (so not every page is grey)."""
    doc = pymupdf.open()
    for number in range(1, pages + 1):
        page = doc.new_page(width=300, height=420)
        page.insert_text((30, 40), f"Page {number}", fontsize=18)
        if number == 2:
            page.draw_rect(pymupdf.Rect(40, 200, 260, 300), color=(0, 0, 1), fill=(0.2, 0.4, 1))
    doc.save(path)
    doc.close()
    return path


class _PixelEngine:
    """A batch engine in the service's process, the ``hf`` engine's shape (``OCREngine``), that
    keeps the images it is given and answers every page with ``FULL_GROUNDED_PAGE``.

    As strict as ``HFEngine.recognize``: at most ``max_batch_size`` pages a call, only when
    loaded; and it takes only RGB pages, which ``PageImage.image`` promises (transformers' image
    processors are handed the page as it is).
    """

    model_name = "pixel-engine"
    max_batch_size = 2

    def __init__(self) -> None:
        self.loaded = False
        self.seen: list[Image.Image] = []

    def load(self) -> None:
        self.loaded = True

    def unload(self) -> None:
        self.loaded = False

    def recognize(self, images: Sequence[Image.Image], options: RecognizeOptions) -> list[PageText]:
        if not self.loaded or not 0 < len(images) <= self.max_batch_size:
            raise EngineError(f"{len(images)} pages passed, loaded: {self.loaded}")
        if any(image.mode != "RGB" for image in images):
            raise EngineError(f"modes {[image.mode for image in images]}: pages are RGB")
        self.seen.extend(image.copy() for image in images)
        return [PageText(FULL_GROUNDED_PAGE + END_MARKER, "eos", 10, 10) for _ in images]


async def _run(
    store: LocalStore, task_id: str, document: Path, pages: int, url: str, engine: Engine | None = None
) -> dict[str, bytes]:
    def factory() -> tuple[Engine, str]:
        if engine is not None:
            return engine, "stand-in"
        remote = RemoteEngine(
            url, model=None, api_key=None, concurrency=4, max_tokens=2000, timeout_seconds=30, retries=0
        )
        return remote, "stand-in"

    models = ModelManager(factory, idle_seconds=5, metrics=Metrics(StandInGpu()))
    pipeline = PagePipeline(store=store, models=models, metrics=Metrics(StandInGpu()))
    job = PageJob(
        task_id=task_id,
        input_path=document,
        kind=DocumentKind.PDF,
        page_numbers=list(range(1, pages + 1)),
        dpi=144,
        max_pixels=10_000_000,
        batch_size=2,
        recognize=OPTIONS,
    )

    async def on_page(page: AssembledPage, seconds: float) -> None:
        pass

    with await pipeline.run(job, on_page=on_page, check_interrupt=lambda: None) as done:
        pipeline.write_outputs(task_id, done, 0)
    await models.unload()
    record = TaskRecord.model_construct(task_id=task_id, lease=0)
    files = {}
    for name in ("full.md", "layout.json"):
        with store.open_result(record, name) as handle:
            files[name] = handle.read()
    return files


async def test_the_engine_gets_the_rendered_pixels_and_a_resumed_task_ends_with_the_same_files(
    tmp_path: Path,
) -> None:
    document = _pdf(tmp_path / "doc.pdf", 3)
    rendered = {
        page.number: page.image
        for page in render_pages(document, DocumentKind.PDF, [1, 2, 3], dpi=144, max_pixels=10_000_000)
    }
    engine = VllmStandIn(answer=full_page_answer)
    try:
        store = LocalStore(tmp_path / "data")
        task_id = uuid.uuid4().hex
        (store.root / "tasks" / task_id).mkdir(parents=True)
        first = await _run(store, task_id, document, 3, engine.url)
        sent = [request_image(body) for body in engine.chat_bodies()]
        assert len(sent) == 3
        # Lossless: every page the engine decodes is the rendered page, pixel for pixel; grey pages
        # come as one channel, which the server makes RGB again (as vLLM does), the blue one as RGB.
        assert {image.convert("RGB").tobytes() for image in sent} == {
            image.tobytes() for image in rendered.values()
        }
        assert sorted(image.mode for image in sent) == ["L", "L", "RGB"]
        assert first["full.md"].count(b"# Annual Report on Regional Services") == 3
        assert FULL_GROUNDED_PAGE.count("<|ref|>") == 9  # what each page's layout holds
        assert [len(page["blocks"]) for page in json.loads(first["layout.json"])["pages"]] == [9, 9, 9]

        # Resumed: raw/ holds every page, so nothing is sent again and the files come out the same.
        again = await _run(store, task_id, document, 3, engine.url)
        assert len(engine.chat_bodies()) == 3
        assert again == first
    finally:
        engine.close()

    # Figure crops come from the decoded PNG: exactly the rendered page's pixels in the box.
    layout = json.loads(first["layout.json"])
    for page in layout["pages"]:
        (figure,) = [block for block in page["blocks"] if "image" in block]
        crop = Image.open(store.root / "tasks" / task_id / figure["image"])
        assert crop.tobytes() == rendered[page["page"]].crop(tuple(figure["bbox"])).tobytes()

    # An engine in the service's process gets every page's RGB pixels, and the files are the same.
    pixel_engine = _PixelEngine()
    other = uuid.uuid4().hex
    (store.root / "tasks" / other).mkdir(parents=True)
    assert await _run(store, other, document, 3, engine.url, pixel_engine) == first
    assert [image.tobytes() for image in pixel_engine.seen] == [rendered[n].tobytes() for n in (1, 2, 3)]

    # The preview: made from the stored page when first asked for, a WebP, then kept.
    record = TaskRecord.model_construct(task_id=task_id, lease=0)
    with store.open_preview(record, 2) as handle:
        preview = Image.open(io.BytesIO(handle.read()))
        assert preview.format == "WEBP"
        assert preview.size == rendered[2].size
    with store.open_preview(record, 2) as handle:
        assert Image.open(io.BytesIO(handle.read())).format == "WEBP"
    pages = store.root / "tasks" / task_id / "pages"
    assert Image.open(pages / "p0002.tiff").convert("RGB").tobytes() == rendered[2].tobytes()
    # A page stored as PNG by a release before pages were TIFF still gets its preview.
    for name in ("p0002.tiff", "p0002.webp"):
        (pages / name).unlink()
    rendered[2].save(pages / "p0002.png")
    with store.open_preview(record, 2) as handle:
        assert Image.open(io.BytesIO(handle.read())).size == rendered[2].size
