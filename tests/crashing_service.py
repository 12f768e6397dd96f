"""``python -m tests.crashing_service``: the service exactly as ``python -m app`` runs it (settings from
``APP_*``, the engine the settings choose), except that its engine kills its own process when it is
given a *crash page*: a page painted all over in ``CRASH_COLOR`` (``crash_pdf`` makes documents with
one). The kill is SIGKILL, as the kernel's OOM killer sends it: no handler, no shutdown, no final
write, the task left ``running`` in the store, exactly what a page that really crashes the model or
takes the machine's memory leaves behind.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Sequence

import pymupdf
import uvicorn
from PIL import Image

from app.engines.async_base import ConcurrentEngine
from app.engines.base import OCREngine, PageText, RecognizeOptions
from app.engines.factory import engine_factory
from app.engines.manager import Engine
from app.main import configure_logging, create_app, settings_from_environment

CRASH_COLOR = (255, 0, 255)  # magenta: no page of tests.documents comes near it


def crash_pdf(pages: int, crash_page: int) -> bytes:
    """A4 pages with a heading each; page ``crash_page`` (1-based) is painted all over in ``CRASH_COLOR``."""
    doc = pymupdf.open()
    for number in range(1, pages + 1):
        page = doc.new_page(width=595, height=842)
        if number == crash_page:
            page.draw_rect(page.rect, color=None, fill=tuple(c / 255 for c in CRASH_COLOR))
        else:
            page.insert_text((72, 72), f"Page {number} heading", fontsize=20)
    data = doc.tobytes()
    doc.close()
    return data


def is_crash_page(image: Image.Image) -> bool:
    """Whether most of the page is ``CRASH_COLOR`` (a thumbnail's pixels, within rounding)."""
    thumbnail = image.convert("RGB").resize((16, 16))
    colors = thumbnail.getcolors(maxcolors=16 * 16) or []
    hits = sum(
        count
        for count, color in colors
        if isinstance(color, tuple) and all(abs(a - b) <= 8 for a, b in zip(color, CRASH_COLOR, strict=True))
    )
    return hits > 16 * 16 // 2


class CrashingEngine:
    """An ``OCREngine`` that recognises with the real one, and SIGKILLs its process on a crash page."""

    def __init__(self, inner: OCREngine) -> None:
        self.inner = inner
        self.model_name = inner.model_name
        self.max_batch_size = inner.max_batch_size

    def load(self) -> None:
        self.inner.load()

    def unload(self) -> None:
        self.inner.unload()

    def recognize(self, images: Sequence[Image.Image], options: RecognizeOptions) -> list[PageText]:
        if any(is_crash_page(image) for image in images):
            os.kill(os.getpid(), signal.SIGKILL)
        return self.inner.recognize(images, options)


def main() -> None:
    settings = settings_from_environment()
    configure_logging(settings)
    build = engine_factory(settings)

    def crashing_factory() -> tuple[Engine, str]:
        engine, why = build()
        if isinstance(engine, ConcurrentEngine):
            raise SystemExit("tests.crashing_service wraps the in-process engine only (APP_BACKEND=hf)")
        return CrashingEngine(engine), why

    app = create_app(settings, engine_factory=crashing_factory)
    uvicorn.run(app, host=settings.listen_host, port=settings.port, log_level=settings.log_level.lower())


if __name__ == "__main__":
    main()
