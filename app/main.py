"""The application: ``create_app(settings)`` wires every long-lived object once, in one place."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.responses import RedirectResponse

from app import __version__
from app.api import system, tasks
from app.api.errors import install_error_handlers
from app.api.http_metrics import HttpMetricsMiddleware
from app.config import Settings
from app.engines.gpu import GpuGate, GpuProbe, NoGpu, NvmlProbe
from app.engines.manager import EngineFactory, ModelManager
from app.metrics import Metrics
from app.pipeline.run import PagePipeline
from app.storage.local import LocalStore
from app.tasks.options import EngineDefaults
from app.tasks.queue import MemoryQueue
from app.tasks.service import Limits, TaskService
from app.tasks.worker import WorkerConfig, WorkerPool

JANITOR_INTERVAL_SECONDS = 600
SHUTDOWN_GRACE_SECONDS = 20  # time a running task gets to reach a page boundary on shutdown


def create_app(
    settings: Settings | None = None,
    *,
    engine_factory: EngineFactory | None = None,
    gpu_probe: GpuProbe | None = None,
) -> FastAPI:
    """Build the service. ``engine_factory`` and ``gpu_probe`` replace the engine and NVML
    (tests stand in a scripted model or a GPU); by default both come from ``settings``."""
    settings = settings or Settings()
    if engine_factory is None:
        from app.engines.factory import engine_factory as default_factory  # imports torch: only when used

        engine_factory = default_factory(settings)
    probe: GpuProbe = gpu_probe or (NoGpu() if settings.force_cpu else NvmlProbe())
    metrics = Metrics(probe)
    store = LocalStore(settings.data_dir)
    queue = MemoryQueue(settings.queue_max)
    models = ModelManager(engine_factory, idle_seconds=settings.model_idle_seconds, metrics=metrics)
    service = TaskService(
        store=store,
        queue=queue,
        metrics=metrics,
        limits=Limits(
            max_pages=settings.max_pages,
            max_dpi=settings.max_dpi,
            max_page_pixels=settings.max_page_pixels,
            result_ttl_hours=settings.result_ttl_hours,
            workers=settings.max_workers,
        ),
    )
    pool = WorkerPool(
        service=service,
        pipeline=PagePipeline(store=store, models=models, metrics=metrics),
        models=models,
        gate=GpuGate(probe, min_free_mb=settings.gpu_min_free_mb, poll_seconds=settings.gpu_poll_seconds),
        metrics=metrics,
        config=WorkerConfig(
            workers=settings.max_workers,
            batch_size=settings.ds_batch_size,
            max_pixels=settings.max_page_pixels,
            engine=EngineDefaults(
                prompt_override=settings.ds_prompt_override,
                base_size=settings.ds_base_size,
                image_size=settings.ds_image_size,
                crop_mode=settings.ds_crop_mode,
                max_new_tokens=settings.ds_max_new_tokens,
                timeout_seconds=settings.page_timeout_seconds,
            ),
        ),
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(service.recover)
        pool.start()
        background = [
            asyncio.create_task(models.run_idle_reaper(), name="dsocr-model-reaper"),
            asyncio.create_task(service.run_janitor(JANITOR_INTERVAL_SECONDS), name="dsocr-janitor"),
        ]
        try:
            yield
        finally:
            await pool.stop(SHUTDOWN_GRACE_SECONDS)
            for job in background:
                job.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await models.unload()

    app = FastAPI(
        title="dsocr-server",
        version=__version__,
        summary="Documents in, Markdown, layout and figures out, with DeepSeek-OCR.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.tasks = service
    app.state.models = models
    app.state.pool = pool
    app.state.metrics = metrics
    install_error_handlers(app)
    app.add_middleware(HttpMetricsMiddleware, metrics=metrics)
    app.include_router(tasks.router)
    app.include_router(system.router)

    @app.get("/", include_in_schema=False)
    async def read_root() -> RedirectResponse:
        return RedirectResponse("/docs")

    return app
