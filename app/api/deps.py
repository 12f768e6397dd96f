"""Dependencies of the routers: the services on ``app.state``, API-key auth and the caller.

A caller is a tenant (``app.tenants``): ``TenantDep`` is the tenant its Bearer key belongs to (or
``None`` with auth off), ``CallerDep`` that tenant's owner id, the one stored on its tasks."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param

from app.api.stream_caps import HeldKind, StreamCaps
from app.config import Settings
from app.errors import ClientError, Unauthorized
from app.tasks.intake import Intake
from app.tasks.readiness import Readiness
from app.tasks.service import TaskService
from app.tenants import Tenant, Tenants, owner_of

__all__ = ["owner_of"]  # where it was before tenants: tools that derive a key's owner id import it here

_bearer = HTTPBearer(
    auto_error=False, description="A key of APP_API_KEYS or of a tenant in APP_TENANTS_FILE."
)


# Dependencies are ``async def`` even where they do not await: FastAPI runs a plain ``def`` one in
# a worker thread, a hop per request for nothing, and a burst of requests would fill that pool.


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_tasks(request: Request) -> TaskService:
    return request.app.state.tasks


async def get_intake(request: Request) -> Intake:
    return request.app.state.intake


async def get_readiness(request: Request) -> Readiness:
    return request.app.state.readiness


async def get_stream_caps(request: Request) -> StreamCaps:
    return request.app.state.stream_caps


async def get_tenants(request: Request) -> Tenants:
    return request.app.state.tenants


SettingsDep = Annotated[Settings, Depends(get_settings)]
TasksDep = Annotated[TaskService, Depends(get_tasks)]
IntakeDep = Annotated[Intake, Depends(get_intake)]
ReadinessDep = Annotated[Readiness, Depends(get_readiness)]
StreamCapsDep = Annotated[StreamCaps, Depends(get_stream_caps)]
TenantsDep = Annotated[Tenants, Depends(get_tenants)]
CredentialsDep = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def require_api_key(tenants: Tenants, credentials: HTTPAuthorizationCredentials | None) -> Tenant | None:
    """Refuse the request with 401 unless auth is off or it carries a valid Bearer key.

    Returns the caller's tenant, or ``None`` with auth off (no key configured anywhere). The key is
    looked up by its SHA-256 digest (``Tenants.by_key``), so timing tells nothing about any key.
    """
    if not tenants.enabled:
        return None
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    tenant = tenants.by_key(credentials.credentials)
    if tenant is None:
        raise Unauthorized("invalid API key")
    return tenant


def authenticate(tenants: Tenants, authorization: str | None) -> Tenant | None:
    """``require_api_key`` on a raw ``Authorization`` header value, parsed as ``HTTPBearer`` parses
    it: for the body-limit middleware, which answers before any dependency runs. Raises
    ``Unauthorized``; returns the tenant, or ``None`` with auth off."""
    scheme, given = get_authorization_scheme_param(authorization)
    credentials = HTTPAuthorizationCredentials(scheme=scheme, credentials=given) if scheme and given else None
    return require_api_key(tenants, credentials)


async def get_tenant(tenants: TenantsDep, credentials: CredentialsDep) -> Tenant | None:
    """``require_api_key`` as a dependency: the caller's tenant (``None`` with auth off), or 401."""
    return require_api_key(tenants, credentials)


# The caller's tenant: for routes that go by its name, role or limits (``None``: auth is off).
TenantDep = Annotated[Tenant | None, Depends(get_tenant)]


async def get_caller(tenant: TenantDep) -> str | None:
    """The caller's owner id (its tenant's, stored on the tasks it creates), or ``None`` with auth off."""
    return tenant.owner if tenant is not None else None


ApiKeyDep = Depends(get_caller)
# The same dependency, so FastAPI runs it once per request: the router's guard and a handler's caller.
CallerDep = Annotated[str | None, Depends(get_caller)]


async def count_rejections(request: Request) -> AsyncIterator[None]:
    """Count every refused submission by its error code, wherever it was refused: the upload
    parser (413, 415), the document checks (422) or the queue (429)."""
    try:
        yield
    except ClientError as exc:
        if not isinstance(exc, Unauthorized):  # not a submission: anyone can knock without a key
            request.app.state.metrics.tasks_rejected.labels(exc.code).inc()
        raise


CountRejectionsDep = Depends(count_rejections)


async def hold_event_stream(caps: StreamCapsDep, caller: CallerDep) -> AsyncIterator[None]:
    """Hold one of the caller's stream slots (``StreamCaps``) from before the route runs until its
    response is over: FastAPI leaves a ``yield`` dependency after the response has been sent, which
    for an event stream is when it ends or its client hangs up. 429 past a cap."""
    with caps.hold(caller, HeldKind.EVENTS):
        yield


HeldStreamDep = Depends(hold_event_stream)
