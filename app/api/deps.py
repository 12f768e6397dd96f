"""Dependencies of the routers: the services on ``app.state``, API-key auth and the caller."""

from __future__ import annotations

import hashlib
import hmac
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

_bearer = HTTPBearer(auto_error=False, description="One of the keys in APP_API_KEYS.")
# Separates owner ids from any other hash of a key; fixed, so ids stay valid across restarts.
_OWNER_LABEL = b"dsocr-server/task-owner/v1"


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


SettingsDep = Annotated[Settings, Depends(get_settings)]
TasksDep = Annotated[TaskService, Depends(get_tasks)]
IntakeDep = Annotated[Intake, Depends(get_intake)]
ReadinessDep = Annotated[Readiness, Depends(get_readiness)]
StreamCapsDep = Annotated[StreamCaps, Depends(get_stream_caps)]
CredentialsDep = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def key_is_valid(given: str, keys: list[str]) -> bool:
    """Compare against every key in constant time, so timing tells nothing about any key."""
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given.encode(), key.encode())
    return matched


def owner_of(key: str) -> str:
    """The owner id stored on the tasks a key creates: an HMAC of the key, never the key itself."""
    return hmac.new(_OWNER_LABEL, key.encode(), hashlib.sha256).hexdigest()


def _caller(keys: list[str], credentials: HTTPAuthorizationCredentials | None) -> str | None:
    if not keys:
        return None
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    if not key_is_valid(credentials.credentials, keys):
        raise Unauthorized("invalid API key")
    return owner_of(credentials.credentials)


def require_api_key(settings: SettingsDep, credentials: CredentialsDep) -> str | None:
    """Refuse the request with 401 unless auth is off or it carries a valid Bearer key.

    Returns the caller's owner id (``owner_of`` its key), or ``None`` with auth off.
    """
    return _caller(settings.api_keys, credentials)


def authenticate(keys: list[str], authorization: str | None) -> str | None:
    """``require_api_key`` on a raw ``Authorization`` header value, parsed as ``HTTPBearer`` parses
    it: for the body-limit middleware, which answers before any dependency runs. Raises
    ``Unauthorized``; returns the owner id, or ``None`` when ``keys`` is empty (auth off)."""
    scheme, given = get_authorization_scheme_param(authorization)
    credentials = HTTPAuthorizationCredentials(scheme=scheme, credentials=given) if scheme and given else None
    return _caller(keys, credentials)


async def get_caller(settings: SettingsDep, credentials: CredentialsDep) -> str | None:
    """``require_api_key`` as a dependency: the caller's owner id, or 401."""
    return require_api_key(settings, credentials)


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
