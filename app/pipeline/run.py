"""One task's pages end to end: render, recognise, parse, assemble, store.

The event loop only awaits here: rendering, assembly and file writes run in threads, inference
goes through the ``ModelManager``. A page's raw output is stored as soon as it exists, so a task
resumed after a restart re-renders its pages but recognises only those without a raw file.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from app.engines.base import PageText, RecognizeOptions
from app.engines.manager import ModelManager
from app.errors import DsocrError, PageFailed
from app.metrics import Metrics
from app.pipeline.assemble import AssembledPage, assemble_page, merge_markdown
from app.pipeline.grounding import parse_page
from app.pipeline.pages import PageImage, render_pages
from app.pipeline.sniff import DocumentKind
from app.storage.local import LocalStore

OnPage = Callable[[AssembledPage, float], Awaitable[None]]
"""Called after each page with the assembled page and the seconds it took."""


@dataclass(frozen=True)
class PageJob:
    """Everything the pipeline needs to know about one task; no HTTP, no task record."""

    task_id: str
    input_path: Path
    kind: DocumentKind
    page_numbers: Sequence[int]
    dpi: float
    max_pixels: int
    batch_size: int
    recognize: RecognizeOptions


class PagePipeline:
    """Runs ``PageJob``s against a store and a shared model."""

    def __init__(self, *, store: LocalStore, models: ModelManager, metrics: Metrics) -> None:
        self._store = store
        self._models = models
        self._metrics = metrics

    async def run(
        self, job: PageJob, *, on_page: OnPage, check_interrupt: Callable[[], None]
    ) -> list[AssembledPage]:
        """Process every page in order and return them assembled; ``check_interrupt`` may raise
        between pages (cancel, shutdown). Figures are stored as each page finishes."""
        done: list[AssembledPage] = []
        batch: list[PageImage] = []
        pages = render_pages(
            job.input_path, job.kind, job.page_numbers, dpi=job.dpi, max_pixels=job.max_pixels
        )

        async def flush() -> None:
            if batch:
                check_interrupt()
                await self._recognize_batch(job, list(batch), done, on_page)
                batch.clear()

        try:
            async with self._models.hold():
                while True:
                    check_interrupt()
                    page = await asyncio.to_thread(next, pages, None)
                    if page is None:
                        break
                    saved = await asyncio.to_thread(self._store.read_raw, job.task_id, page.number)
                    if saved is not None:
                        await flush()  # keep page order: earlier pages first
                        text = PageText(saved["text"], saved["stop_reason"], saved.get("tokens", 0))
                        await self._finish_page(job, page, text, len(done), done, on_page, seconds=0.0)
                        continue
                    batch.append(page)
                    if len(batch) >= job.batch_size:
                        await flush()
                await flush()
        finally:
            pages.close()
        return done

    async def _recognize_batch(
        self, job: PageJob, batch: list[PageImage], done: list[AssembledPage], on_page: OnPage
    ) -> None:
        started = time.perf_counter()
        try:
            texts = await self._models.recognize([page.image for page in batch], job.recognize)
        except DsocrError as exc:
            if len(batch) == 1:
                exc.message = f"page {batch[0].number}: {exc.message}"
            else:
                exc.message = f"pages {batch[0].number}-{batch[-1].number}: {exc.message}"
            raise
        seconds = (time.perf_counter() - started) / len(batch)
        for page, text in zip(batch, texts, strict=True):
            payload = {
                "page": page.number,
                "text": text.text,
                "stop_reason": text.stop_reason,
                "tokens": text.tokens,
                "seconds": round(seconds, 3),
            }
            await asyncio.to_thread(self._store.write_raw, job.task_id, page.number, payload)
            await self._finish_page(job, page, text, len(done), done, on_page, seconds=seconds)

    async def _finish_page(
        self,
        job: PageJob,
        page: PageImage,
        text: PageText,
        index: int,
        done: list[AssembledPage],
        on_page: OnPage,
        *,
        seconds: float,
    ) -> None:
        try:
            assembled = await asyncio.to_thread(self._assemble, job.task_id, page, text, index)
        except DsocrError:
            raise
        except (
            Exception
        ) as exc:  # a parser or crop bug must fail this task with the page named, not the worker
            raise PageFailed(f"page {page.number}: {type(exc).__name__}: {exc}") from exc
        done.append(assembled)
        if seconds:
            self._metrics.page_duration.observe(seconds)
            self._metrics.pages_processed.labels("truncated" if assembled.truncated else "complete").inc()
        await on_page(assembled, seconds)

    def _assemble(self, task_id: str, page: PageImage, text: PageText, index: int) -> AssembledPage:
        parsed = parse_page(text.text, text.stop_reason)
        assembled = assemble_page(page, parsed, index)
        for name, crop in assembled.crops:
            self._store.write_image(task_id, name, crop)
        return assembled

    def write_outputs(self, task_id: str, pages: Sequence[AssembledPage]) -> None:
        """Store ``full.md`` and ``layout.json`` (blocking)."""
        self._store.write_result(task_id, "full.md", merge_markdown(pages).encode())
        layout = {"version": 1, "pages": [page.layout for page in pages]}
        self._store.write_result(task_id, "layout.json", json.dumps(layout, ensure_ascii=False).encode())
