"""The client's error tree: every failure a caller can act on is a ``DsocrError``.

    DsocrError (code, message, status)
    ├── ConnectionFailed    no answer from the server (refused, DNS, timeout); status 0
    ├── WaitTimeout         ``wait(timeout=...)`` ran out before the task ended; also a TimeoutError
    └── ApiError            the server answered with an error body
        ├── BadRequest          400 (bad URL, url_fetch_failed ...)
        ├── AuthError           401: no key, or a wrong one
        ├── NotFound            404: no such task (or another key's), or no such result file
        ├── Conflict            409: not finished yet, or already finished
        ├── PayloadTooLarge     413
        ├── UnsupportedFile     415: not a PDF or an image
        ├── InvalidInput        422: corrupt document, bad options, too many pages, reused key
        ├── QueueFull           429 after the retries; carries ``retry_after`` seconds
        └── ServerError         5xx

The server's stable ``code`` (``invalid_document``, ``queue_full`` ...) is kept on every error, so
callers can branch on it where the class is too coarse.
"""

from __future__ import annotations

import httpx


class DsocrError(Exception):
    """Base of every client error: ``code`` is the server's stable code, ``status`` the HTTP status."""

    def __init__(self, code: str, message: str, status: int = 0) -> None:
        super().__init__(f"{code}: {message}" if status == 0 else f"{status} {code}: {message}")
        self.code = code
        self.message = message
        self.status = status


class ConnectionFailed(DsocrError):
    """Raised when the server cannot be reached or does not answer in time."""


class WaitTimeout(DsocrError, TimeoutError):
    """Raised by ``wait`` when its ``timeout`` passes before the task ends; the task keeps running."""


class ApiError(DsocrError):
    """Raised for an error answer of the API; subclasses by HTTP status."""


class BadRequest(ApiError):
    """400: the request cannot be served as sent (a refused or unreachable URL)."""


class AuthError(ApiError):
    """401: the API key is missing or wrong."""


class NotFound(ApiError):
    """404: no such task for this key (other keys' tasks are invisible), or no such result file."""


class Conflict(ApiError):
    """409: the task is not finished yet (results), or already finished (cancel)."""


class PayloadTooLarge(ApiError):
    """413: the document exceeds the server's upload limit."""


class UnsupportedFile(ApiError):
    """415: the document is neither a PDF nor a supported image."""


class InvalidInput(ApiError):
    """422: a corrupt document, bad options, too many pages, or an Idempotency-Key reused."""


class QueueFull(ApiError):
    """429: the server's queue stayed full through every retry; ``retry_after`` is its last hint."""

    def __init__(self, code: str, message: str, status: int = 429, retry_after: float = 1.0) -> None:
        super().__init__(code, message, status)
        self.retry_after = retry_after


class ServerError(ApiError):
    """5xx: the server failed; the request may succeed later."""


_BY_STATUS: dict[int, type[ApiError]] = {
    400: BadRequest,
    401: AuthError,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    415: UnsupportedFile,
    422: InvalidInput,
}


def retry_after_seconds(response: httpx.Response, default: float = 1.0) -> float:
    """The ``Retry-After`` header in seconds (the server sends delta-seconds), else ``default``."""
    try:
        return max(0.0, float(response.headers["retry-after"]))
    except (KeyError, ValueError):
        return default


def error_from_response(response: httpx.Response) -> ApiError:
    """The typed error for an error answer; its body is the API's ``{"error": {"code", "message"}}``,
    or anything else when a proxy answered instead."""
    try:
        detail = response.json()["error"]
        code, message = str(detail["code"]), str(detail["message"])
    except (ValueError, KeyError, TypeError):
        code, message = "http_error", response.text[:200] or response.reason_phrase
    status = response.status_code
    if status == 429:
        return QueueFull(code, message, status, retry_after_seconds(response))
    if status >= 500:
        return ServerError(code, message, status)
    return _BY_STATUS.get(status, ApiError)(code, message, status)


def describe_error(exc: BaseException) -> str:
    """The reason to show a person for ``exc``, whatever it is: the server's ``code: message`` for a
    ``DsocrError``, the OS's words (``os_error: ...``) for a file that cannot be read or written,
    else ``internal_error:`` with the exception's class and text."""
    if isinstance(exc, DsocrError):
        return f"{exc.code}: {exc.message}"
    if isinstance(exc, OSError):
        return f"os_error: {exc}"
    return f"internal_error: {type(exc).__name__}: {exc}"
