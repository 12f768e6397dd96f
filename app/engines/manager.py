"""The model's lifecycle: loaded on first use, shared by every worker, unloaded when idle.

Workers ``hold()`` the model for the length of a task, so it is never unloaded between two pages
of the same task; the idle clock starts when the last holder lets go.

Two kinds of engine sit behind one ``recognize``. A blocking, batch-oriented ``OCREngine`` (``hf``)
runs in a thread, one batch at a time, serialised by an asyncio lock with no timeout: waiting
workers queue behind it instead of failing (the earlier implementation's 180 s lock timeout failed
every second concurrent job). A ``ConcurrentEngine`` (``vllm``) is awaited one page per coroutine,
with up to ``max_concurrency`` pages in flight across every task, bounded by one semaphore here.
``limits()`` tells the pipeline which shape of work suits the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from PIL import Image

from app.engines.async_base import ConcurrentEngine, ServerHealth
from app.engines.base import OCREngine, PageText, RecognizeOptions
from app.engines.vllm import RemoteEngine
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


Engine = OCREngine | ConcurrentEngine


@runtime_checkable
class PreparingEngine(Protocol):
    """A batch engine whose ``recognize`` is ``generate(prepare(images, options))``, where
    ``prepare`` (the CPU's preprocessing) may run in another thread while ``generate`` runs
    (``app.engines.hf.HFEngine``; named here so this module imports no torch)."""

    def prepare(self, images: Sequence[Image.Image], options: RecognizeOptions) -> Any: ...

    def generate(self, batch: Any) -> list[PageText]: ...


EngineFactory = Callable[[], tuple[Engine, str]]
"""Builds the engine, not yet loaded (blocking; may download a config), and says why this model."""

HealthCheck = Callable[[], Awaitable[ServerHealth]]
"""Asks the engine's inference server whether it answers (engines that have one)."""


@dataclass(frozen=True)
class DispatchLimits:
    """How a task should feed the engine."""

    pages_per_call: int  # the most pages one ``recognize`` call takes
    calls_in_flight: int  # ``recognize`` calls one task keeps going at once
    # Whether the size options (base_size, image_size, crop_mode) change what the model sees: the
    # vllm engines leave the image geometry to vLLM's processor, the hf engines apply them.
    sizes_apply: bool = True
    # Whether the engine sends a page's lossless encoding as it is (``app.lossless.held``) and
    # never reads its pixels: the pipeline then leaves them undecoded.
    sends_encoded: bool = False


class ModelManager:
    """Owns the engine: builds and loads it on first use, runs recognition, unloads it when idle.

    ``health_check``, when given, reports on the engine's inference server without loading anything.
    """

    def __init__(
        self,
        factory: EngineFactory,
        *,
        idle_seconds: float,
        metrics: Metrics,
        health_check: HealthCheck | None = None,
        planned: tuple[str, str] | None = None,
    ) -> None:
        self._factory = factory
        self._planned = planned  # (model, why) shown before the first load, when known in advance
        self._health_check = health_check
        self._idle_seconds = idle_seconds
        self._metrics = metrics
        self._engine: Engine | None = None
        self._loaded = False
        self._choice_reason: str | None = None
        self._last_error: str | None = None
        self._load_lock = asyncio.Lock()
        self._infer_lock = asyncio.Lock()
        self._pages_gate: asyncio.Semaphore | None = None  # bounds a concurrent engine's pages in flight
        self._in_flight = 0  # pages a concurrent engine is working on
        self._holders = 0
        self._last_used = time.monotonic()

    @property
    def state(self) -> ModelState:
        planned_model, planned_reason = self._planned or (None, None)
        model = self._engine.model_name if self._engine is not None else planned_model
        return ModelState(self._loaded, model, self._choice_reason or planned_reason, self._last_error)

    async def server_health(self) -> ServerHealth | None:
        """The engine's inference server's answer, or ``None`` when the engine has no server."""
        return await self._health_check() if self._health_check is not None else None

    async def limits(self) -> DispatchLimits:
        """Load the engine if needed and say how to feed it: batches (``OCREngine``), or single
        pages, ``max_concurrency`` of them at once (``ConcurrentEngine``).

        A batch engine runs one call at a time (``recognize``), but a task keeps two going: the
        next batch waits at the lock, its pages ready, while the current one generates, so the
        engine starts it the moment it is free instead of after the task has stored the pages
        just done (``bench/pipeline.py``: that gap was most of the service's overhead).
        """
        engine = await self.ensure_loaded()
        if isinstance(engine, ConcurrentEngine):
            return DispatchLimits(
                pages_per_call=1,
                calls_in_flight=engine.max_concurrency,
                sizes_apply=False,
                sends_encoded=isinstance(engine, RemoteEngine),
            )
        return DispatchLimits(pages_per_call=engine.max_batch_size, calls_in_flight=2)

    @contextlib.asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        """Keep the model from being unloaded while a task runs (it is loaded lazily by ``recognize``)."""
        self._holders += 1
        try:
            yield
        finally:
            self._holders -= 1
            self._last_used = time.monotonic()

    async def ensure_loaded(self) -> Engine:
        """Load the model if needed (once, even with many callers) and return the engine."""
        async with self._load_lock:
            engine = self._engine or await self._build()
            if not self._loaded:
                started = time.perf_counter()
                try:
                    await _load(engine)
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
                log.info("model %s loaded in %.1f s", engine.model_name, elapsed)
            self._last_used = time.monotonic()
            return engine

    async def _build(self) -> Engine:
        """Call the factory (once it succeeds) and set up what the engine's kind needs."""
        try:
            engine, self._choice_reason = await asyncio.to_thread(self._factory)
        except DsocrError as exc:
            self._last_error = exc.message
            raise
        if isinstance(engine, ConcurrentEngine):
            self._pages_gate = asyncio.Semaphore(engine.max_concurrency)
        self._engine = engine
        return engine

    async def recognize(self, images: Sequence[Image.Image], options: RecognizeOptions) -> list[PageText]:
        """One ``PageText`` per image, in order, loading the engine first if needed.

        A batch engine gets ``images`` in one call (at most ``limits().pages_per_call`` of them); a
        concurrent engine gets each page as its own request, all of them under the shared bound.
        Raises what the engine raises (``EngineError``, ``ModelUnavailable``).
        """
        while True:
            engine = await self.ensure_loaded()
            if isinstance(engine, ConcurrentEngine):
                pages = [asyncio.ensure_future(self._recognize_page(image, options)) for image in images]
                try:
                    return list(await asyncio.gather(*pages))
                finally:
                    for page in pages:
                        page.cancel()  # the siblings of a failed page: its batch fails anyway
            # Take this call's place in line before preparing: calls generate in the order they
            # were made (a task's pages in page order), whichever preparation ends first.
            turn = asyncio.ensure_future(self._infer_lock.acquire())
            try:
                run = await _prepared(engine, images, options)
                await asyncio.shield(turn)
            except BaseException:
                _leave_line(turn, self._infer_lock)
                raise
            try:
                if not self._loaded:
                    continue  # unloaded while this call waited for the lock: load again
                return await _run_blocking(run)
            finally:
                self._infer_lock.release()
                self._last_used = time.monotonic()

    async def _recognize_page(self, image: Image.Image, options: RecognizeOptions) -> PageText:
        assert self._pages_gate is not None
        async with self._pages_gate:
            engine = await self.ensure_loaded()  # again: an idle unload may have come while waiting
            assert isinstance(engine, ConcurrentEngine)
            self._in_flight += 1
            try:
                return await engine.recognize_page(image, options)
            finally:
                self._in_flight -= 1
                self._last_used = time.monotonic()

    async def unload(self, *, only_if_idle: bool = False) -> bool:
        """Unload the model and give its memory back; returns whether it was unloaded."""
        async with self._load_lock, self._infer_lock:
            if self._engine is None or not self._loaded:
                return False
            # Checked under both locks: a task may have taken the model since the reaper looked.
            # Concurrent pages hold neither lock, so they are counted instead.
            busy = self._holders or self._in_flight
            if only_if_idle and (busy or time.monotonic() - self._last_used < self._idle_seconds):
                return False
            await _unload(self._engine)
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


async def _load(engine: Engine) -> None:
    if isinstance(engine, ConcurrentEngine):
        await engine.start()
    else:
        await asyncio.to_thread(engine.load)


async def _unload(engine: Engine) -> None:
    if isinstance(engine, ConcurrentEngine):
        await engine.stop()
    else:
        await asyncio.to_thread(engine.unload)


def _leave_line(turn: asyncio.Future[Any], lock: asyncio.Lock) -> None:
    """Give up a place in ``lock``'s line taken with ``acquire``: release the lock if the turn
    came, else cancel the wait (``asyncio.Lock`` then passes the turn to the next in line)."""
    if turn.done() and not turn.cancelled():
        lock.release()
    else:
        turn.cancel()


async def _prepared(
    engine: OCREngine, images: Sequence[Image.Image], options: RecognizeOptions
) -> Callable[[], list[PageText]]:
    """What recognises ``images`` under the inference lock. A ``PreparingEngine`` preprocesses them,
    in a thread, outside the lock: the next batch is made ready while the current one generates
    (on a GPU the model would otherwise wait for the CPU between batches)."""
    if isinstance(engine, PreparingEngine):
        batch = await asyncio.to_thread(engine.prepare, images, options)
        return functools.partial(engine.generate, batch)
    return functools.partial(engine.recognize, images, options)


async def _run_blocking(recognize: Callable[[], list[PageText]]) -> list[PageText]:
    """``recognize`` in a thread; a cancelled caller still waits for the thread to end.

    A thread cannot be stopped. Returning early would release the inference lock while the model
    is still generating, and the next batch would run a second ``generate()`` beside it.
    """
    call = asyncio.ensure_future(asyncio.to_thread(recognize))
    try:
        return await asyncio.shield(call)
    except asyncio.CancelledError:
        await asyncio.wait([call])
        if not call.cancelled():
            call.exception()  # retrieved, so asyncio does not log it as never retrieved
        raise
