"""Health, readiness and metrics."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.api.deps import CredentialsDep, SettingsDep, require_api_key
from app.errors import BackendUnavailable, ResultNotFound

router = APIRouter(tags=["system"])


@router.get("/healthz")
async def read_health() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "not ready: a worker died or storage is read-only"}})
async def read_readiness(request: Request) -> JSONResponse:
    """Readiness: workers alive, storage writable; shows the model state and which model was chosen."""
    state = request.app.state
    models = state.models.state
    pool = state.pool  # None on an API replica (APP_ROLE=api): its workers run elsewhere
    writable = await asyncio.to_thread(state.tasks.store.writable)
    workers_ok = pool is None or pool.healthy
    try:
        depth: int | None = await state.tasks.queue.depth()
    except BackendUnavailable:
        depth = None
    # The vllm engine's OCR server, when it has one: reported, not required, so that results stay
    # reachable (and tasks keep queueing) while that server restarts.
    server = await state.models.server_health()
    body: dict[str, Any] = {
        "status": "ready" if workers_ok and writable and depth is not None else "not_ready",
        "role": state.settings.role,
        "workers": {
            "alive": pool.alive if pool is not None else 0,
            "configured": state.settings.max_workers if pool is not None else 0,
        },
        "storage_writable": writable,
        "queue_depth": depth,
        "model": {
            "loaded": models.loaded,
            "name": models.model,
            "detail": models.detail,
            "last_error": models.last_error,
            "server": dataclasses.asdict(server) if server is not None else None,
        },
    }
    return JSONResponse(body, status_code=200 if body["status"] == "ready" else 503)


def _metrics_guard(settings: SettingsDep, credentials: CredentialsDep) -> None:
    if not settings.metrics_enabled:
        raise ResultNotFound("metrics are disabled (APP_METRICS_ENABLED=false)")
    if settings.metrics_require_auth:
        require_api_key(settings, credentials)


@router.get("/metrics", dependencies=[Depends(_metrics_guard)], response_class=Response)
async def read_metrics(request: Request) -> Response:
    """Prometheus metrics in the text exposition format."""
    registry = request.app.state.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
