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
from app.api import links, results, system, tasks
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
from app.tasks.readiness import Readiness
from app.tasks.service import Limits, TaskService
from app.tasks.worker import WorkerConfig, WorkerPool

log = logging.getLogger(__name__)

JANITOR_INTERVAL_SECONDS = 600
QUEUE_SAMPLE_SECONDS = 5  # how often the queue gauges are read again (a shared queue changes elsewhere)
SHUTDOWN_GRACE_SECONDS = 20  # time a running task gets to reach a page boundary on shutdown
OPEN_WARNING = (
    "APP_API_KEYS is empty: authentication is DISABLED. Anyone who can reach this service can "
    "submit documents, read, download and cancel every task. Set APP_API_KEYS=<key>[,<key>...] "
    "to require 'Authorization: Bearer <key>' on /v1/."
)


def create_app(
    settings: Settings | None = None,
    *,
    engine_factory: EngineFactory | None = None,
    gpu_probe: GpuProbe | None = None,
) -> FastAPI:
    """Build the service. ``engine_factory`` and ``gpu_probe`` replace the engine and NVML
    (tests stand in a scripted model or a GPU); by default both come from ``settings``."""
    settings = settings or Settings()
    serves_api = settings.role in ("all", "api")
    runs_workers = settings.role in ("all", "worker")
    if serves_api and not settings.api_keys:
        log.warning(OPEN_WARNING)
    probe: GpuProbe = gpu_probe or (NoGpu() if settings.force_cpu else NvmlProbe())
    metrics = Metrics(probe, role=settings.role)
    backends = build_backends(settings, metrics)
    store = backends.store
    models = _model_manager(settings, engine_factory, metrics)
    signer = LinkSigner(_link_secret(settings))
    followups = _followups(settings, store, signer, metrics)
    renders = RenderPool(
        processes=settings.render_processes,
        page_seconds=settings.render_page_seconds,
        memory_mb=settings.render_memory_mb,
    )
    ledger = TaskLedger(
        store=store,
        queue=backends.queue,
        events=backends.events,
        metrics=metrics,
        workers=settings.max_workers,
        followups=followups,
    )
    service = TaskService(ledger=ledger, renders=renders, limits=_limits(settings))
    pool = _worker_pool(settings, ledger, models, renders, probe, metrics) if runs_workers else None
    lifecycle = _Lifecycle(backends, renders, models, followups, ledger, service, pool, serves_api)

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
    app.state.metrics = metrics
    app.state.tasks = service
    app.state.intake = _intake(settings, service, store)
    app.state.readiness = _readiness(settings, pool, backends, models)
    app.state.followups = followups
    app.state.downloads = _downloads(settings, store, signer)
    app.state.stream_caps = StreamCaps(
        per_key=settings.max_streams_per_key, total=settings.max_streams_total, metrics=metrics
    )
    _install_http(app, settings, metrics, serves_api=serves_api)
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


def _followups(settings: Settings, store: TaskStore, signer: LinkSigner, metrics: Metrics) -> FollowUps:
    """Publishing (``APP_PUBLISH_BACKEND``) and webhooks (only with ``APP_WEBHOOK_SECRET``)."""
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
    return FollowUps(
        store=store,
        publisher=publisher_from_settings(settings, store=store, signer=signer),
        webhooks=webhooks,
        auto_publish=settings.auto_publish,
        metrics=metrics,
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
        ),
    )


def _intake(settings: Settings, service: TaskService, store: TaskStore) -> Intake:
    return Intake(
        service,
        spool=store.spool_path,
        max_upload_bytes=settings.max_upload_bytes,
        allow_private=settings.url_allow_private,
        connect_timeout=settings.url_connect_timeout_seconds,
        read_timeout=settings.url_read_timeout_seconds,
        max_redirects=settings.url_max_redirects,
    )


def _readiness(
    settings: Settings, pool: WorkerPool | None, backends: Backends, models: ModelManager
) -> Readiness:
    return Readiness(
        pool=pool,
        store=backends.store,
        queue=backends.queue,
        models=models,
        role=settings.role,
        auth_enabled=bool(settings.api_keys),
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
        try:
            yield
        finally:
            if self.pool is not None:
                await self.pool.stop(SHUTDOWN_GRACE_SECONDS)
            await self.followups.stop()  # after the pool: a task ending during its grace still plans its own
            for job in background:
                job.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await self.models.unload()
            await self.renders.close()
            await self.backends.close()


def _install_http(app: FastAPI, settings: Settings, metrics: Metrics, *, serves_api: bool) -> None:
    """The error handlers, the middleware and the routes this process's role serves."""
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
        return  # a worker: it takes tasks from the shared queue and serves nothing else
    app.include_router(tasks.router)
    app.include_router(results.router)  # a task's results: same prefix and API key as tasks.router
    app.include_router(tasks.convert_router)
    app.include_router(links.router)  # share links: no API key, the signature is the credential

    if settings.ui_enabled:
        install_console(app)  # the web console at /ui/, and the route it renders result pages with

    @app.get("/", include_in_schema=False)
    async def read_root() -> RedirectResponse:
        return RedirectResponse("/ui/" if settings.ui_enabled else "/docs")


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
