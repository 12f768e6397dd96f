"""A client of the dsocr OCR service: ``Client``, ``AsyncClient``, the ``dsocr`` command and an MCP server.

It speaks the public HTTP API only and imports nothing from the service, so it runs anywhere the
service can be reached.
"""

from dsocr_client._client import AsyncClient, Client, Progress, Task
from dsocr_client.errors import (
    ApiError,
    AuthError,
    BadRequest,
    Conflict,
    ConnectionFailed,
    DsocrError,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    QueueFull,
    ServerError,
    UnsupportedFile,
    WaitTimeout,
)
from dsocr_client.models import PageQuality, ResultPage, TaskError, TenantUsage, Usage, UsageFigures

__all__ = [
    "ApiError",
    "AsyncClient",
    "AuthError",
    "BadRequest",
    "Client",
    "Conflict",
    "ConnectionFailed",
    "DsocrError",
    "InvalidInput",
    "NotFound",
    "PageQuality",
    "PayloadTooLarge",
    "Progress",
    "QueueFull",
    "ResultPage",
    "ServerError",
    "Task",
    "TaskError",
    "TenantUsage",
    "UnsupportedFile",
    "Usage",
    "UsageFigures",
    "WaitTimeout",
]
