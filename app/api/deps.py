"""Dependencies of the routers: the services on ``app.state`` and API-key auth."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.config import Settings
from app.errors import Unauthorized
from app.tasks.service import TaskService

_bearer = HTTPBearer(auto_error=False, description="One of the keys in APP_API_KEYS.")


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_tasks(request: Request) -> TaskService:
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


def require_api_key(settings: SettingsDep, credentials: CredentialsDep) -> None:
    """Refuse the request with 401 unless auth is off or it carries a valid Bearer key."""
    if not settings.api_keys:
        return
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    if not key_is_valid(credentials.credentials, settings.api_keys):
        raise Unauthorized("invalid API key")


ApiKeyDep = Depends(require_api_key)
