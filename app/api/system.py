"""Health, readiness and metrics."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.api.deps import CredentialsDep, ReadinessDep, SettingsDep, TenantsDep, require_api_key
from app.errors import ResultNotFound, Unauthorized
from app.tenants import Tenants

router = APIRouter(tags=["system"])


@router.get("/healthz")
async def read_health() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    responses={
        200: {
            "description": "ready. Without API keys, or with a valid key, also the model and engine: "
            "which model, why, its last error and the engine server's URL (never shown to others)"
        },
        503: {"description": "not ready: a worker died, storage is read-only or the queue unreachable"},
    },
)
async def read_readiness(
    readiness: ReadinessDep, tenants: TenantsDep, credentials: CredentialsDep
) -> JSONResponse:
    """Readiness: workers alive, storage writable, queue reachable; with a key, the model and engine too."""
    # Probes and load balancers call without a key; what the model is, where it came from, why it
    # failed to load and where the engine server is are for the service's users only.
    body = await readiness.report(with_model=_holds_a_key(tenants, credentials))
    return JSONResponse(body, status_code=200 if body["status"] == "ready" else 503)


def _holds_a_key(tenants: Tenants, credentials: HTTPAuthorizationCredentials | None) -> bool:
    """Whether the request may see what the API shows: auth is off, or it carries a valid key."""
    try:
        require_api_key(tenants, credentials)
    except Unauthorized:
        return False
    return True


def _metrics_guard(settings: SettingsDep, tenants: TenantsDep, credentials: CredentialsDep) -> None:
    if not settings.metrics_enabled:
        raise ResultNotFound("metrics are disabled (APP_METRICS_ENABLED=false)")
    if settings.metrics_require_auth:
        require_api_key(tenants, credentials)


@router.get("/metrics", dependencies=[Depends(_metrics_guard)], response_class=Response)
async def read_metrics(request: Request) -> Response:
    """Prometheus metrics in the text exposition format."""
    registry = request.app.state.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
