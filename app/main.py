"""The application: ``create_app(settings)`` wires every long-lived object once, in one place."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from fastapi_offline import FastAPIOffline
from pydantic import ValidationError

from app import __version__
from app.api import links, results, system, tasks, usage
from app.api.body_limits import BodyLimits
from app.api.errors import install_error_handlers
from app.api.http_metrics import HttpMetricsMiddleware
from app.api.stream_caps import StreamCaps
from app.api.ui import install_console
from app.backends import Backends, build_backends
from app.config import Settings
from app.engines.factory import engine_factory as default_engine_factory
from app.engines.factory import planned_model, server_health_check
from app.engines.gpu import GpuGate, GpuProbe, NoGpu, NvmlProbe
from app.engines.manager import EngineFactory, ModelManager
from app.errors import BackendUnavailable
from app.metrics import Metrics
from app.pipeline.render_pool import RenderPool
from app.pipeline.run import PagePipeline
from app.storage.base import TaskStore
from app.storage.links import LinkSigner
from app.storage.publish import publisher_from_settings
from app.storage.webhooks import WebhookSender
from app.tasks.downloads import Downloads
from app.tasks.followups import FollowUps
from app.tasks.intake import Intake
from app.tasks.ledger import TaskLedger
from app.tasks.options import EngineDefaults
from app.tasks.queue import TenantShares
from app.tasks.quotas import MemoryBook, QuotaBook, Quotas
from app.tasks.readiness import Readiness
from app.tasks.service import Limits, TaskService
from app.tasks.usage import UsageMeter
from app.tasks.worker import WorkerConfig, WorkerPool
from app.tenants import Tenants, TenantsFileError

log = logging.getLogger(__name__)

JANITOR_INTERVAL_SECONDS = 600
USAGE_FLUSH_SECONDS = 5  # how often bytes served are written to the usage store
QUEUE_SAMPLE_SECONDS = 5  # how often the queue gauges are read again (a shared queue changes elsewhere)
SHUTDOWN_GRACE_SECONDS = 20  # time a running task gets to reach a page boundary on shutdown
OPEN_WARNING = (
    "APP_API_KEYS is empty: authentication is DISABLED. Anyone who can reach this service can "
    "submit documents, read, download and cancel every task. Set APP_API_KEYS=<key>[,<key>...] "
    "(or APP_TENANTS_FILE) to require 'Authorization: Bearer <key>' on /v1/."
)


def create_app(
    settings: Settings | None = None,
    *,
    engine_factory: EngineFactory | None = None,
    gpu_probe: GpuProbe | None = None,
) -> FastAPI:
    """Build the service. ``engine_factory`` and ``gpu_probe`` replace the engine and NVML
    (tests stand in a scripted model or a GPU); by default both come from ``settings``. Raises
    ``TenantsFileError`` for an ``APP_TENANTS_FILE`` that cannot be read or is invalid."""
    settings = settings or Settings()
    serves_api = settings.role in ("all", "api")
    runs_workers = settings.role in ("all", "worker")
    tenants = Tenants.from_settings(settings)
    if serves_api and not tenants.enabled:
        log.warning(OPEN_WARNING)
    probe: GpuProbe = gpu_probe or (NoGpu() if settings.force_cpu else NvmlProbe())
    metrics = Metrics(probe, role=settings.role)
    backends = build_backends(settings, metrics, TenantShares(tenants))
    store = backends.store
    models = _model_manager(settings, engine_factory, metrics)
    signer = LinkSigner(_link_secret(settings))
    followups = _followups(settings, store, signer, metrics, tenants)
    renders = RenderPool(
        processes=settings.render_processes,
        page_seconds=settings.render_page_seconds,
        memory_mb=settings.render_memory_mb,
    )
    meter = UsageMeter(usage=backends.usage, store=store, metrics=metrics, tenants=tenants)
    ledger = TaskLedger(
        store=store,
        queue=backends.queue,
        events=backends.events,
        metrics=metrics,
        workers=settings.max_workers,
        followups=followups,
        usage=meter,
    )
    quotas = Quotas(_quota_book(settings, store))
    service = TaskService(ledger=ledger, renders=renders, limits=_limits(settings), quotas=quotas)
    pool = _worker_pool(settings, ledger, models, renders, probe, metrics) if runs_workers else None
    lifecycle = _Lifecycle(
        backends, renders, models, followups, ledger, service, pool, serves_api, tenants, quotas, meter
    )

    # /docs and /redoc serve Swagger UI and ReDoc from the service itself (fastapi-offline, pinned):
    # FastAPI's default pulls unpinned script from a CDN onto the origin where the console keeps its key.
    app = FastAPIOffline(
        static_url="/docs-assets",
        title="dsocr-server",
        version=__version__,
        summary="Documents in, Markdown, layout and figures out, with DeepSeek-OCR.",
        lifespan=lifecycle.run,
    )
    # What the routers reach through api/deps.py and api/results.py.
    app.state.settings = settings
    app.state.tenants = tenants
    app.state.quotas = quotas  # its clock: the UTC day pages count on
    app.state.metrics = metrics
    app.state.usage = meter
    app.state.tasks = service
    app.state.intake = _intake(settings, service, store, tenants)
    app.state.readiness = _readiness(settings, pool, backends, models, tenants)
    app.state.followups = followups
    app.state.downloads = _downloads(settings, store, signer)
    app.state.stream_caps = StreamCaps(
        per_key=settings.max_streams_per_key,
        total=settings.max_streams_total,
        metrics=metrics,
        tenants=tenants,
    )
    _install_http(app, settings, metrics, tenants, serves_api=serves_api)
    return app


# --- what create_app builds --------------------------------------------------------------------


def _model_manager(
    settings: Settings, engine_factory: EngineFactory | None, metrics: Metrics
) -> ModelManager:
    """The engine manager, over ``engine_factory`` or else the engine ``settings`` name, whose model
    (and why that one) ``/readyz`` shows before it loads."""
    planned = None
    if engine_factory is None:
        engine_factory = default_engine_factory(settings)  # the model loads on the first task
        planned = planned_model(settings)
    return ModelManager(
        engine_factory,
        idle_seconds=settings.model_idle_seconds,
        metrics=metrics,
        health_check=server_health_check(settings),
        planned=planned,
    )


def _link_secret(settings: Settings) -> bytes:
    """The key share links are signed with: ``APP_LINK_SECRET``, or a random one a restart forgets."""
    if settings.link_secret is not None:
        return settings.link_secret.get_secret_value().encode()
    log.warning("APP_LINK_SECRET is unset: share links use a random key and stop working at a restart")
    return secrets.token_bytes(32)


def _followups(
    settings: Settings, store: TaskStore, signer: LinkSigner, metrics: Metrics, tenants: Tenants
) -> FollowUps:
    """Publishing (``APP_PUBLISH_BACKEND``) and webhooks, signed with the task's tenant's
    ``webhook_secret`` or ``APP_WEBHOOK_SECRET`` (a task with neither takes no ``callback_url``)."""
    webhooks = WebhookSender(
        allow_private=settings.url_allow_private,
        timeout_seconds=settings.webhook_timeout_seconds,
        max_attempts=settings.webhook_max_attempts,
        backoff_seconds=settings.webhook_backoff_seconds,
        user_agent=f"dsocr-server/{__version__}",
    )
    secret = settings.webhook_secret
    return FollowUps(
        store=store,
        publisher=publisher_from_settings(settings, store=store, signer=signer),
        webhooks=webhooks,
        auto_publish=settings.auto_publish,
        metrics=metrics,
        webhook_secret=secret.get_secret_value().encode() if secret is not None else None,
        tenants=tenants,
    )


def _limits(settings: Settings) -> Limits:
    return Limits(
        max_pages=settings.max_pages,
        max_dpi=settings.max_dpi,
        max_page_pixels=settings.max_page_pixels,
        result_ttl_hours=settings.result_ttl_hours,
        workers=settings.max_workers,
    )


def _worker_pool(
    settings: Settings,
    ledger: TaskLedger,
    models: ModelManager,
    renders: RenderPool,
    probe: GpuProbe,
    metrics: Metrics,
) -> WorkerPool:
    """``APP_MAX_WORKERS`` workers, each taking a task when the GPU has room for it."""
    # vLLM reserves its share of the GPU up front (APP_VLLM_GPU_MEMORY_UTILIZATION, here or on its
    # server) and schedules within it: gating tasks on what it left free would stop them all.
    gate_free_mb = settings.gpu_min_free_mb if settings.backend == "hf" else 0
    return WorkerPool(
        ledger=ledger,
        pipeline=PagePipeline(store=ledger.store, models=models, metrics=metrics, renders=renders),
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
            page_retries=settings.page_retries,
            quality_min_agreement=settings.quality_min_agreement,
        ),
    )


def _quota_book(settings: Settings, store: TaskStore) -> QuotaBook:
    """Where tenants' quotas are counted: in this process, or in the shared Redis (scale-out)."""
    if settings.queue_backend == "memory":
        return MemoryBook(store)
    # Imported here, as in app.backends: the one-process default needs no redis-py.
    from app.storage.redis_conn import async_client
    from app.tasks.redis_quotas import RedisBook

    assert settings.redis_url is not None  # Settings refuses redis without a URL
    # Its own small pool: one short script per submit, never a blocking read.
    client = async_client(
        settings.redis_url, max_connections=8, pool_timeout=settings.redis_pool_timeout_seconds
    )
    return RedisBook(client)


def _intake(settings: Settings, service: TaskService, store: TaskStore, tenants: Tenants) -> Intake:
    return Intake(
        service,
        tenants=tenants,
        spool=store.spool_path,
        max_upload_bytes=settings.max_upload_bytes,
        allow_private=settings.url_allow_private,
        connect_timeout=settings.url_connect_timeout_seconds,
        read_timeout=settings.url_read_timeout_seconds,
        max_redirects=settings.url_max_redirects,
    )


def _readiness(
    settings: Settings, pool: WorkerPool | None, backends: Backends, models: ModelManager, tenants: Tenants
) -> Readiness:
    return Readiness(
        pool=pool,
        store=backends.store,
        queue=backends.queue,
        models=models,
        role=settings.role,
        tenants=tenants,
        workers=settings.max_workers,
    )


def _downloads(settings: Settings, store: TaskStore, signer: LinkSigner) -> Downloads:
    return Downloads(
        store=store,
        signer=signer,
        base_url=settings.link_base_url,
        default_expire_seconds=settings.link_expire_seconds,
        max_expire_seconds=settings.link_max_expire_seconds,
    )


@dataclass(frozen=True)
class _Lifecycle:
    """What runs from start-up to shutdown: started in this order, stopped in about the reverse."""

    backends: Backends
    renders: RenderPool
    models: ModelManager
    followups: FollowUps
    ledger: TaskLedger
    service: TaskService
    pool: WorkerPool | None  # None where this process runs no workers (APP_ROLE=api)
    serves_api: bool
    tenants: Tenants  # its file is reloaded in the background
    quotas: Quotas
    usage: UsageMeter  # bytes served are written in the background, and at the end

    @contextlib.asynccontextmanager
    async def run(self, app: FastAPI) -> AsyncIterator[None]:
        """The app's lifespan: everything started before the first request, stopped after the last."""
        await self.backends.start()
        await self.renders.start()
        await self.service.recover()
        if self.pool is not None:
            self.pool.start()
        if not self.backends.queue.durable:
            # Publishes and webhooks a stopped process left unfinished. (With a shared store a task's
            # follow-ups run on the worker that ended it; one cut short by its worker's end is not
            # resumed: see README "Scaling out".)
            for task_id in await asyncio.to_thread(self.followups.unfinished):
                self.followups.launch(task_id)
        background = [
            asyncio.create_task(
                self.ledger.run_queue_monitor(QUEUE_SAMPLE_SECONDS), name="dsocr-queue-monitor"
            )
        ]
        if self.pool is not None:
            background.append(asyncio.create_task(self.models.run_idle_reaper(), name="dsocr-model-reaper"))
        if self.serves_api:
            background.append(
                asyncio.create_task(self.service.run_janitor(JANITOR_INTERVAL_SECONDS), name="dsocr-janitor")
            )
        if self.tenants.file is not None:
            background.append(asyncio.create_task(self.tenants.watch(), name="dsocr-tenants-reload"))
        if self.serves_api:
            background.append(
                asyncio.create_task(self.usage.run_flusher(USAGE_FLUSH_SECONDS), name="dsocr-usage-flusher")
            )
        try:
            yield
        finally:
            if self.pool is not None:
                await self.pool.stop(SHUTDOWN_GRACE_SECONDS)
            await self.followups.stop()  # after the pool: a task ending during its grace still plans its own
            for job in background:
                job.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            try:
                await asyncio.to_thread(self.usage.flush)
            except BackendUnavailable as exc:
                log.warning("the bytes served since the last flush are not recorded: %s", exc.message)
            await self.models.unload()
            await self.renders.close()
            await self.quotas.close()
            await self.backends.close()


def _install_http(
    app: FastAPI, settings: Settings, metrics: Metrics, tenants: Tenants, *, serves_api: bool
) -> None:
    """The error handlers, the middleware and the routes this process's role serves."""
    install_error_handlers(app)
    app.add_middleware(
        BodyLimits,
        tenants=tenants,
        max_json_bytes=settings.max_json_body_kb * 1024,
        max_upload_bytes=settings.max_upload_bytes,
        metrics=metrics,
    )  # inside the metrics middleware, which counts its refusals
    app.add_middleware(HttpMetricsMiddleware, metrics=metrics)
    app.include_router(system.router)  # every role answers /healthz, /readyz and /metrics
    if not serves_api:
        return  # a worker: it takes tasks from the shared queue and serves nothing else
    app.include_router(tasks.router)
    app.include_router(results.router)  # a task's results: same prefix and API key as tasks.router
    app.include_router(tasks.convert_router)
    app.include_router(links.router)  # share links: no API key, the signature is the credential
    app.include_router(usage.router)

    if settings.ui_enabled:
        install_console(app)  # the web console at /ui/, and the route it renders result pages with

    @app.get("/", include_in_schema=False)
    async def read_root() -> RedirectResponse:
        return RedirectResponse("/ui/" if settings.ui_enabled else "/docs")


def settings_from_environment() -> Settings:
    """``Settings()`` from ``APP_*`` variables; invalid ones end the process with a message naming
    each problem (no traceback, no secret values), as a start-up should."""
    try:
        settings = Settings()
    except ValidationError as exc:
        problems = "\n".join(f"  {error['msg']}" for error in exc.errors())
        sys.exit(f"dsocr-server cannot start, the settings are invalid:\n{problems}")
    try:
        Tenants.from_settings(settings)  # read again by create_app; a bad file must stop us here
    except TenantsFileError as exc:
        sys.exit(f"dsocr-server cannot start, the tenants file is invalid:\n  {exc}")
    return settings


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
