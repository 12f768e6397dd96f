"""The model's lifecycle: loaded on first use, shared by every worker, unloaded when idle.

Workers ``hold()`` the model for the length of a task, so it is never unloaded between two pages
of the same task; the idle clock starts when the last holder lets go. Inference is serialised by
an asyncio lock with no timeout: waiting workers queue behind it instead of failing (the earlier
implementation's 180 s lock timeout failed every second concurrent job).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from PIL import Image

from app.engines.base import OCREngine, PageText, RecognizeOptions
from app.errors import DsocrError, EngineError
from app.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelState:
    """What /readyz shows about the model."""

    loaded: bool
    model: str | None  # the checkpoint, once known
    detail: str | None  # why this checkpoint was chosen, or why loading failed
    last_error: str | None


EngineFactory = Callable[[], tuple[OCREngine, str]]
"""Builds the engine (blocking; may download a config) and says why this model was chosen."""


class ModelManager:
    def __init__(self, factory: EngineFactory, *, idle_seconds: float, metrics: Metrics) -> None:
        self._factory = factory
        self._idle_seconds = idle_seconds
        self._metrics = metrics
        self._engine: OCREngine | None = None
        self._loaded = False
        self._choice_reason: str | None = None
        self._last_error: str | None = None
        self._load_lock = asyncio.Lock()
        self._infer_lock = asyncio.Lock()
        self._holders = 0
        self._last_used = time.monotonic()

    @property
    def state(self) -> ModelState:
        model = self._engine.model_name if self._engine is not None else None
        return ModelState(self._loaded, model, self._choice_reason, self._last_error)

    @property
    def max_batch_size(self) -> int:
        return self._engine.max_batch_size if self._engine is not None else 1

    @contextlib.asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        """Keep the model from being unloaded while a task runs (it is loaded lazily by ``recognize``)."""
        self._holders += 1
        try:
            yield
        finally:
            self._holders -= 1
            self._last_used = time.monotonic()

    async def ensure_loaded(self) -> OCREngine:
        """Load the model if needed (once, even with many callers) and return the engine."""
        async with self._load_lock:
            if self._engine is None:
                try:
                    self._engine, self._choice_reason = await asyncio.to_thread(self._factory)
                except DsocrError as exc:
                    self._last_error = exc.message
                    raise
            if not self._loaded:
                started = time.perf_counter()
                try:
                    await asyncio.to_thread(self._engine.load)
                except DsocrError as exc:
                    self._last_error = exc.message
                    raise
                except Exception as exc:
                    self._last_error = f"{type(exc).__name__}: {exc}"
                    raise EngineError(f"the model failed to load: {self._last_error}") from exc
                elapsed = time.perf_counter() - started
                self._loaded = True
                self._last_error = None
                self._metrics.model_load_seconds.observe(elapsed)
                self._metrics.model_loaded.set(1)
                log.info("model %s loaded in %.1f s", self._engine.model_name, elapsed)
            self._last_used = time.monotonic()
            return self._engine

    async def recognize(self, images: Sequence[Image.Image], options: RecognizeOptions) -> list[PageText]:
        while True:
            engine = await self.ensure_loaded()
            async with self._infer_lock:
                if not self._loaded:
                    continue  # unloaded while this call waited for the lock: load again
                try:
                    return await asyncio.to_thread(engine.recognize, images, options)
                finally:
                    self._last_used = time.monotonic()

    async def unload(self, *, only_if_idle: bool = False) -> bool:
        """Unload the model and give its memory back; returns whether it was unloaded."""
        async with self._load_lock, self._infer_lock:
            if self._engine is None or not self._loaded:
                return False
            # Checked under both locks: a task may have taken the model since the reaper looked.
            if only_if_idle and (self._holders or time.monotonic() - self._last_used < self._idle_seconds):
                return False
            await asyncio.to_thread(self._engine.unload)
            self._loaded = False
            self._metrics.model_loaded.set(0)
            log.info("model %s unloaded", self._engine.model_name)
            return True

    async def run_idle_reaper(self) -> None:
        """Unload the model after ``idle_seconds`` with no holder and no inference; runs until cancelled."""
        interval = max(0.05, min(self._idle_seconds / 4, 5.0))
        while True:
            await asyncio.sleep(interval)
            idle_for = time.monotonic() - self._last_used
            idle = self._loaded and self._holders == 0 and idle_for >= self._idle_seconds
            if idle and await self.unload(only_if_idle=True):
                self._metrics.model_unloads.inc()
