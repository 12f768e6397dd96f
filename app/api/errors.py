"""Errors become responses here, in one place, always as ``{"error": {"code", "message"}}``."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.errors import DsocrError, QueueFull, QuotaExceeded, Unauthorized

log = logging.getLogger(__name__)

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized", 413: "payload_too_large"}


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


async def _dsocr_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DsocrError)
    headers = None
    if isinstance(exc, QuotaExceeded):
        headers = {"Retry-After": str(exc.retry_after), **rate_limit_headers(exc)}
    elif isinstance(exc, QueueFull):
        headers = {"Retry-After": str(exc.retry_after)}
    elif isinstance(exc, Unauthorized):
        headers = {"WWW-Authenticate": "Bearer"}
    if exc.status_code >= 500:
        log.error("%s %s failed: %s", request.method, request.url.path, exc.message)
    return error_response(exc.status_code, exc.code, exc.message, headers)


def rate_limit_headers(exc: QuotaExceeded) -> dict[str, str]:
    """The IETF RateLimit fields of a refusal, as draft-ietf-httpapi-ratelimit-headers-10 writes them
    (Structured Field Lists, RFC 9651): ``RateLimit-Policy`` names the policy (our limit's name, a
    String) with its quota ``q`` and window ``w`` in seconds (left out for a limit on what is held
    at once); ``RateLimit`` gives what ``r`` remains of it and ``t``, the seconds until it resets."""
    window = f";w={exc.window_seconds}" if exc.window_seconds is not None else ""
    return {
        "RateLimit-Policy": f'"{exc.limit}";q={exc.quota}{window}',
        "RateLimit": f'"{exc.limit}";r={exc.remaining};t={exc.retry_after}',
    }


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = []
    for err in exc.errors():
        where = ".".join(str(part) for part in err.get("loc", ()) if part != "body")
        problems.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    return error_response(422, "invalid_request", "; ".join(problems) or "invalid request")


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    return error_response(exc.status_code, code, str(exc.detail), dict(exc.headers or {}))


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal_error", "internal server error; the details are in the server log")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(DsocrError, _dsocr_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
