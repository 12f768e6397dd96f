"""Request bodies are bounded before anything reads them, and a request without a key is never read.

FastAPI reads and parses a JSON body before a route's dependencies run (the API-key check among
them), and a route that asks Starlette for its body gets all of it: a check in a route or in a
dependency comes after the memory is spent. ``BodyLimits`` is pure ASGI middleware in front of
routing, so for every HTTP request, in this order:

1. with API keys configured (``APP_API_KEYS`` or ``APP_TENANTS_FILE``), a request for a keyed path
   (``/v1/...``, share links excepted) that carries no valid ``Authorization: Bearer`` key is
   answered 401 before a byte of its body is read;
2. a declared ``Content-Length`` over the request's limit is answered 413 before reading;
3. the bytes that do arrive are counted (a chunked body declares no length), and past the limit
   the request is refused with 413.

Any answer sent while the body is still unread (these refusals, and a route's own early ones such as
429 when the queue is full) first reads and drops the rest of the body when it is small (at most
``DRAIN_BYTES``, within ``DRAIN_SECONDS``): a server that closes a connection with unread bytes in
its buffer resets it, and the client, still writing, never sees the answer (httpx reports a
``ReadError`` for a wrong key on a 1 kB upload). A larger body is left unread and the connection
closes after the answer.

Limits: a ``multipart/form-data`` body sent to an upload route (``UPLOAD_PATHS``) may carry
``APP_MAX_UPLOAD_MB`` (or the caller's tenant's own ``max_upload_mb``) plus ``MULTIPART_OVERHEAD``;
it streams on to the route, which spools it to disk, and the stream raises ``PayloadTooLarge``
past the limit (the route deletes its partial file, the error handlers answer 413). Every other
body is small: it is read here, into memory, up to ``APP_MAX_JSON_BODY_KB``, checked for JSON
nested deeper than ``MAX_JSON_DEPTH`` (422 before any parser recurses into it: Python's ``json``
raises ``RecursionError`` on 30,000 levels) and handed on whole. Refusals use the one error
shape, ``{"error": {"code", "message"}}``.
"""

from __future__ import annotations

import asyncio

from python_multipart.multipart import parse_options_header
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.deps import authenticate
from app.api.errors import error_response
from app.errors import PayloadTooLarge, Unauthorized
from app.json_depth import MAX_JSON_DEPTH, json_nesting_exceeds
from app.metrics import Metrics
from app.pipeline.sources import MULTIPART_OVERHEAD
from app.storage.links import SHARE_PREFIX
from app.tenants import Tenant, Tenants

UPLOAD_PATHS = frozenset({"/v1/tasks/upload", "/v1/convert"})  # the routes that stream a multipart upload
# Routes that create tasks: their refusals count in dsocr_tasks_rejected, as the routes count theirs.
SUBMISSION_PATHS = UPLOAD_PATHS | {"/v1/tasks"}
KEYED_PREFIX = "/v1/"  # every route under it needs a key when APP_API_KEYS is set, except share links
_MAX_LENGTH_DIGITS = 18  # a Content-Length of more digits is past every limit
DRAIN_BYTES = 1 << 20  # bytes of a refused body read and dropped so that the client sees the answer
DRAIN_SECONDS = 5.0  # and the time that may take; past either, the connection closes instead


class BodyLimits:
    """The ASGI middleware described in the module docstring; auth is off when ``tenants`` has no key."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        tenants: Tenants,
        max_json_bytes: int,
        max_upload_bytes: int,
        metrics: Metrics,
    ) -> None:
        self.app = app
        self._tenants = tenants
        self._max_json_bytes = max_json_bytes
        self._max_upload_bytes = max_upload_bytes
        self._metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = _route_path(scope)
        headers = Headers(scope=scope)
        tenant = None
        if (
            self._tenants.enabled
            and path.startswith(KEYED_PREFIX)
            and not path.startswith(f"{SHARE_PREFIX}/")
        ):
            try:
                tenant = authenticate(self._tenants, headers.get("authorization"))
            except Unauthorized as exc:
                challenge = {"WWW-Authenticate": "Bearer"}
                unread = _has_body(headers) and not await _drained(receive, headers)
                await _refuse(
                    scope, receive, send, exc.status_code, exc.code, exc.message, challenge, close=unread
                )
                return
        media_type = parse_options_header(headers.get("content-type"))[0]
        if path in UPLOAD_PATHS and media_type == b"multipart/form-data":
            await self._stream_upload(scope, receive, send, path, headers, tenant)
        else:
            await self._read_small_body(scope, receive, send, path, headers, media_type)

    async def _stream_upload(
        self, scope: Scope, receive: Receive, send: Send, path: str, headers: Headers, tenant: Tenant | None
    ) -> None:
        """Hand the upload on as it arrives, counting it; the route spools it to disk."""
        own_mb = tenant.limits.max_upload_mb if tenant is not None else None
        if own_mb is not None and tenant is not None:
            allowed, setting = own_mb * 2**20, f"max_upload_mb={own_mb} of tenant {tenant.name!r}"
        else:
            allowed = self._max_upload_bytes
            setting = f"APP_MAX_UPLOAD_MB={allowed // 2**20}"
        limit = allowed + MULTIPART_OVERHEAD
        message = f"the upload is larger than the limit of {allowed} bytes ({setting})"
        if _declared_length(headers) > limit:
            await self._too_large(scope, receive, send, path, headers, message)
            return
        received = 0
        complete = False

        async def counted() -> Message:
            nonlocal received, complete
            event = await receive()
            if event["type"] == "http.request":
                received += len(event.get("body", b""))
                complete = not event.get("more_body", False)
                if received > limit:
                    # Raised inside the route's read: it deletes what it spooled, then the error
                    # handlers answer 413 (and the submission's rejection is counted there).
                    raise PayloadTooLarge(message)
            elif event["type"] == "http.disconnect":
                complete = True
            return event

        async def send_after_drain(event: Message) -> None:
            # A route that answers before reading the upload (401, 429): drop a small rest first.
            nonlocal complete
            if event["type"] == "http.response.start" and not complete and received <= limit:
                complete = True
                await _drained(receive, headers, already=received)
            await send(event)

        await self.app(scope, counted, send_after_drain)

    async def _read_small_body(
        self, scope: Scope, receive: Receive, send: Send, path: str, headers: Headers, media_type: bytes
    ) -> None:
        """Read the whole (small) body here, check it, and hand it on as one message."""
        limit = self._max_json_bytes
        message = (
            f"the request body is larger than the limit of {limit} bytes for JSON "
            f"(APP_MAX_JSON_BODY_KB={limit // 1024}); documents are uploaded as multipart/form-data"
        )
        if _declared_length(headers) > limit:
            await self._too_large(scope, receive, send, path, headers, message, drain=True)
            return
        chunks: list[bytes] = []
        received = 0
        more_body = True
        while more_body:
            event = await receive()
            if event["type"] == "http.disconnect":
                return  # the client left: nobody to answer
            chunk = event.get("body", b"")
            received += len(chunk)
            if received > limit:
                more = event.get("more_body", False)
                await self._too_large(
                    scope, receive, send, path, headers, message, drain=more, already=received
                )
                return
            chunks.append(chunk)
            more_body = event.get("more_body", False)
        body = b"".join(chunks)
        # Not multipart: FastAPI parses JSON media types, POST /v1/convert anything else.
        if body and media_type != b"multipart/form-data" and json_nesting_exceeds(body):
            detail = f"the JSON body nests arrays and objects deeper than {MAX_JSON_DEPTH} levels"
            await _refuse(scope, receive, send, 422, "invalid_request", detail, close=False)  # all read
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the client's disconnect, for streams and long-polls

        await self.app(scope, replay, send)

    async def _too_large(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        path: str,
        headers: Headers,
        message: str,
        *,
        drain: bool = False,
        already: int = 0,
    ) -> None:
        """413; with ``drain``, a small unread rest of the body is dropped first (module docstring)."""
        if path in SUBMISSION_PATHS and scope["method"] == "POST":
            self._metrics.tasks_rejected.labels(PayloadTooLarge.code).inc()
        status, code = PayloadTooLarge.status_code, PayloadTooLarge.code
        unread = not (drain and await _drained(receive, headers, already=already))
        await _refuse(scope, receive, send, status, code, message, close=unread)


async def _refuse(
    scope: Scope,
    receive: Receive,
    send: Send,
    status: int,
    code: str,
    message: str,
    headers: dict[str, str] | None = None,
    *,
    close: bool,
) -> None:
    """Answer in the one error shape. With ``close``, for a body left (partly) unread, the
    connection closes after the answer, so the server never takes in the rest of it."""
    headers = {**(headers or {}), "Connection": "close"} if close else headers
    await error_response(status, code, message, headers)(scope, receive, send)


async def _drained(receive: Receive, headers: Headers, *, already: int = 0) -> bool:
    """Read and drop the rest of a body declared (or, chunked, found) to be at most ``DRAIN_BYTES``
    in all, within ``DRAIN_SECONDS``; whether all of it was read."""
    if _declared_length(headers) > DRAIN_BYTES:
        return False
    received = already
    try:
        async with asyncio.timeout(DRAIN_SECONDS):
            while True:
                event = await receive()
                if event["type"] != "http.request":
                    return False  # the client left
                received += len(event.get("body", b""))
                if received > DRAIN_BYTES:
                    return False
                if not event.get("more_body", False):
                    return True
    except TimeoutError:
        return False


def _route_path(scope: Scope) -> str:
    """The path routing matches: without the ``root_path`` a proxy mounts the service under."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def _has_body(headers: Headers) -> bool:
    """Whether the request carries a body: a length above zero, or chunks (RFC 9112 section 6.3)."""
    return _declared_length(headers) > 0 or "transfer-encoding" in headers


def _declared_length(headers: Headers) -> int:
    """The ``Content-Length`` as a number; 0 when absent (the server refuses a malformed one)."""
    value = headers.get("content-length", "").strip()
    if not (value.isascii() and value.isdigit()):
        return 0
    return int(value) if len(value) <= _MAX_LENGTH_DIGITS else 10**_MAX_LENGTH_DIGITS  # int() stops at 4300
