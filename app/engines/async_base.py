"""The interface of engines that take pages one at a time, many in flight at once.

``OCREngine`` (``base.py``) is blocking and batch-oriented: the caller hands it a batch and a
thread waits for the whole batch. A server such as vLLM batches by itself, continuously, across
everything it is sent; what it needs from us is many page requests at once. An engine of this kind
is awaited on the event loop, one coroutine per page, and the ``ModelManager`` bounds how many are
in flight (``max_concurrency``, shared by every task). Only the ``ModelManager`` tells the two kinds
apart (``isinstance(engine, ConcurrentEngine)``); the ``PagePipeline`` asks it for
``DispatchLimits`` (pages per call, calls in flight) and works the same way for both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from PIL import Image

from app.engines.base import PageText, RecognizeOptions


@runtime_checkable
class ConcurrentEngine(Protocol):
    """An OCR engine whose pages are recognised by concurrent coroutines.

    ``start`` and ``stop`` are idempotent and called on the event loop that runs
    ``recognize_page``. ``recognize_page`` is only called between them, by up to
    ``max_concurrency`` callers at once, and returns the page's ``PageText``. Failures raise
    ``EngineError`` (``ModelUnavailable`` when the model or its runtime cannot be had here);
    ``stop`` does not raise.
    """

    model_name: str  # the model in use, as shown in /readyz (may be refined by ``start``)
    max_concurrency: int  # page requests this engine wants in flight at once

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def recognize_page(self, image: Image.Image, options: RecognizeOptions) -> PageText: ...


@dataclass(frozen=True)
class ServerHealth:
    """Whether the inference server an engine talks to answers (shown by /readyz)."""

    url: str
    reachable: bool
    detail: str  # what the server said, or why it could not be reached
