"""Dependencies of the routers: the services on ``app.state``, API-key auth and the caller."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.config import Settings
from app.errors import ClientError, Unauthorized
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


SettingsDep = Annotated[Settings, Depends(get_settings)]
TasksDep = Annotated[TaskService, Depends(get_tasks)]
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


def require_api_key(settings: SettingsDep, credentials: CredentialsDep) -> str | None:
    """Refuse the request with 401 unless auth is off or it carries a valid Bearer key.

    Returns the caller's owner id (``owner_of`` its key), or ``None`` with auth off.
    """
    if not settings.api_keys:
        return None
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    if not key_is_valid(credentials.credentials, settings.api_keys):
        raise Unauthorized("invalid API key")
    return owner_of(credentials.credentials)


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
