"""The application: ``create_app(settings)`` wires every long-lived object once, in one place."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import sys
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from fastapi_offline import FastAPIOffline
from pydantic import ValidationError

from app import __version__
from app.api import links, system, tasks
from app.api.body_limits import BodyLimits
from app.api.errors import install_error_handlers
from app.api.http_metrics import HttpMetricsMiddleware
from app.api.stream_caps import StreamCaps
from app.api.ui import install_console
from app.backends import build_backends
from app.config import Settings
from app.engines.factory import engine_factory as default_engine_factory
from app.engines.factory import planned_model, server_health_check
from app.engines.gpu import GpuGate, GpuProbe, NoGpu, NvmlProbe
from app.engines.manager import EngineFactory, ModelManager
from app.metrics import Metrics
from app.pipeline.render_pool import RenderPool
from app.pipeline.run import PagePipeline
from app.storage.links import LinkSigner
from app.storage.publish import publisher_from_settings
from app.storage.webhooks import WebhookSender
from app.tasks.downloads import Downloads
from app.tasks.followups import FollowUps
from app.tasks.options import EngineDefaults
from app.tasks.service import Limits, TaskService
from app.tasks.worker import WorkerConfig, WorkerPool

log = logging.getLogger(__name__)

JANITOR_INTERVAL_SECONDS = 600
QUEUE_SAMPLE_SECONDS = 5  # how often the queue gauges are read again (a shared queue changes elsewhere)
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
    planned = None
    if engine_factory is None:
        engine_factory = default_engine_factory(settings)  # the model loads on the first task
        planned = planned_model(settings)
    probe: GpuProbe = gpu_probe or (NoGpu() if settings.force_cpu else NvmlProbe())
    metrics = Metrics(probe, role=settings.role)
    serves_api = settings.role in ("all", "api")
    runs_workers = settings.role in ("all", "worker")
    # vLLM reserves its share of the GPU up front (APP_VLLM_GPU_MEMORY_UTILIZATION, here or on its
    # server) and schedules within it: gating tasks on what it left free would stop them all.
    gate_free_mb = settings.gpu_min_free_mb if settings.backend == "hf" else 0
    backends = build_backends(settings, metrics)
    store = backends.store
    models = ModelManager(
        engine_factory,
        idle_seconds=settings.model_idle_seconds,
        metrics=metrics,
        health_check=server_health_check(settings),
        planned=planned,
    )
    if serves_api and not settings.api_keys:
        log.warning(
            "APP_API_KEYS is empty: authentication is DISABLED. Anyone who can reach this service can "
            "submit documents, read, download and cancel every task. Set APP_API_KEYS=<key>[,<key>...] "
            "to require 'Authorization: Bearer <key>' on /v1/."
        )
    if settings.link_secret is not None:
        link_secret = settings.link_secret.get_secret_value().encode()
    else:
        link_secret = secrets.token_bytes(32)
        log.warning("APP_LINK_SECRET is unset: share links use a random key and stop working at a restart")
    signer = LinkSigner(link_secret)
    webhooks = None
    if settings.webhook_secret is not None:
        webhooks = WebhookSender(
            secret=settings.webhook_secret.get_secret_value().encode(),
            allow_private=settings.url_allow_private,
            timeout_seconds=settings.webhook_timeout_seconds,
            max_attempts=settings.webhook_max_attempts,
            backoff_seconds=settings.webhook_backoff_seconds,
            user_agent=f"dsocr-server/{__version__}",
        )
    followups = FollowUps(
        store=store,
        publisher=publisher_from_settings(settings, store=store, signer=signer),
        webhooks=webhooks,
        auto_publish=settings.auto_publish,
        metrics=metrics,
    )
    downloads = Downloads(
        store=store,
        signer=signer,
        base_url=settings.link_base_url,
        default_expire_seconds=settings.link_expire_seconds,
        max_expire_seconds=settings.link_max_expire_seconds,
    )
    renders = RenderPool(
        processes=settings.render_processes,
        page_seconds=settings.render_page_seconds,
        memory_mb=settings.render_memory_mb,
    )
    service = TaskService(
        store=store,
        queue=backends.queue,
        renders=renders,
        metrics=metrics,
        events=backends.events,
        followups=followups,
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
        pipeline=PagePipeline(store=store, models=models, metrics=metrics, renders=renders),
        models=models,
        gate=GpuGate(probe, min_free_mb=gate_free_mb, poll_seconds=settings.gpu_poll_seconds),
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
            visibility_seconds=settings.visibility_timeout_seconds,
        ),
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await backends.start()
        await renders.start()
        await service.recover()
        if runs_workers:
            pool.start()
        if not backends.queue.durable:
            # Publishes and webhooks a stopped process left unfinished. (With a shared store a task's
            # follow-ups run on the worker that ended it; one cut short by its worker's end is not
            # resumed: see README "Scaling out".)
            for task_id in await asyncio.to_thread(followups.unfinished):
                followups.launch(task_id)
        background = [
            asyncio.create_task(service.run_queue_monitor(QUEUE_SAMPLE_SECONDS), name="dsocr-queue-monitor")
        ]
        if runs_workers:
            background.append(asyncio.create_task(models.run_idle_reaper(), name="dsocr-model-reaper"))
        if serves_api:
            background.append(
                asyncio.create_task(service.run_janitor(JANITOR_INTERVAL_SECONDS), name="dsocr-janitor")
            )
        try:
            yield
        finally:
            if runs_workers:
                await pool.stop(SHUTDOWN_GRACE_SECONDS)
            await followups.stop()  # after the pool: a task ending during its grace still plans its own
            for job in background:
                job.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await models.unload()
            await renders.close()
            await backends.close()

    # /docs and /redoc serve Swagger UI and ReDoc from the service itself (fastapi-offline, pinned):
    # FastAPI's default pulls unpinned script from a CDN onto the origin where the console keeps its key.
    app = FastAPIOffline(
        static_url="/docs-assets",
        title="dsocr-server",
        version=__version__,
        summary="Documents in, Markdown, layout and figures out, with DeepSeek-OCR.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.tasks = service
    app.state.models = models
    app.state.pool = pool if runs_workers else None
    app.state.followups = followups
    app.state.downloads = downloads
    app.state.metrics = metrics
    app.state.stream_caps = StreamCaps(
        per_key=settings.max_streams_per_key, total=settings.max_streams_total, metrics=metrics
    )
    install_error_handlers(app)
    app.add_middleware(
        BodyLimits,
        api_keys=settings.api_keys,
        max_json_bytes=settings.max_json_body_kb * 1024,
        max_upload_bytes=settings.max_upload_bytes,
        metrics=metrics,
    )  # inside the metrics middleware, which counts its refusals
    app.add_middleware(HttpMetricsMiddleware, metrics=metrics)
    app.include_router(system.router)  # every role answers /healthz, /readyz and /metrics
    if not serves_api:
        return app  # a worker: it takes tasks from the shared queue and serves nothing else
    app.include_router(tasks.router)
    app.include_router(tasks.convert_router)
    app.include_router(links.router)  # share links: no API key, the signature is the credential

    if settings.ui_enabled:
        install_console(app)  # the web console at /ui/, and the route it renders result pages with

    @app.get("/", include_in_schema=False)
    async def read_root() -> RedirectResponse:
        return RedirectResponse("/ui/" if settings.ui_enabled else "/docs")

    return app


def settings_from_environment() -> Settings:
    """``Settings()`` from ``APP_*`` variables; invalid ones end the process with a message naming
    each problem (no traceback, no secret values), as a start-up should."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = "\n".join(f"  {error['msg']}" for error in exc.errors())
        sys.exit(f"dsocr-server cannot start, the settings are invalid:\n{problems}")


def configure_logging(settings: Settings) -> None:
    """The service's own loggers at ``APP_LOG_LEVEL`` on stderr (uvicorn configures only its own)."""
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


@functools.cache
def _app_from_environment() -> FastAPI:
    settings = settings_from_environment()
    configure_logging(settings)
    return create_app(settings)


def __getattr__(name: str) -> FastAPI:
    """``app.main:app`` for ``uvicorn app.main:app`` and other ASGI servers: built from the
    environment on first access, not on import, so importing this module reads no settings and
    tests build apps side by side. The same object on every access."""
    if name == "app":
        return _app_from_environment()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
