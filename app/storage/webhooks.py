"""Signed webhooks: POSTing a finished task's view to its ``callback_url``.

Every try sends the same JSON body with these headers::

    Content-Type: application/json
    X-Dsocr-Event: task.succeeded | task.failed | task.canceled
    X-Dsocr-Delivery: <id, the same on every try of one delivery>
    X-Dsocr-Signature: t=<unix seconds>,v2=<hex HMAC-SHA256(secret, f"{t}.{delivery}.{event}.{body}")>

The secret is the task's tenant's own ``webhook_secret`` where the tenants file gives it one, else
``APP_WEBHOOK_SECRET``: no tenant's receiver holds a key that signs another tenant's deliveries.
Scheme ``v2`` signs the delivery id and the event with the body, so a captured delivery cannot be
replayed under another id (past a receiver's de-duplication) or as another event; ``v1`` signed
only ``t`` and the body and is no longer sent. The fields are unambiguous with dots between them:
``t`` is digits, the delivery id hex, the event one of three fixed names. A receiver recomputes the
HMAC, compares in constant time, and refuses a ``t`` far from its clock (replays);
``verify_signature`` is the reference, and refuses a malformed header without raising. A 2xx answer
ends the delivery; anything else (another status, a redirect, no answer) is tried again after a
doubling wait, up to ``max_attempts`` tries. Connections go through the URL tasks' address guard,
checked where the socket is opened, so a callback cannot reach a private address by DNS tricks.

A receiver is not trusted to answer sanely: only the status line and headers of its answer are
read (their size is bounded by h11), never its body, and the request asks for no compression
(``Accept-Encoding: identity``), so a gzip bomb or an endless body costs nothing. Each try has one
deadline for all of it, connecting, sending and the answer's headers: a receiver that dribbles a
byte at a time, which per-read timeouts never stop, is cut off at ``timeout_seconds``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio
import httpx

from app.addresses import GuardedTransport, is_public_address
from app.errors import UrlNotAllowed

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Dsocr-Signature"
EVENT_HEADER = "X-Dsocr-Event"
DELIVERY_HEADER = "X-Dsocr-Delivery"
MAX_BACKOFF_SECONDS = 300.0
SIGNATURE_TOLERANCE_SECONDS = 300  # how old a signature ``verify_signature`` accepts by default
SCHEME = "v2"  # the signature's version, its key in the header


def _mac(secret: bytes, body: bytes, timestamp: int, *, event: str, delivery_id: str) -> str:
    signed = f"{timestamp}.{delivery_id}.{event}.".encode() + body
    return hmac.new(secret, signed, hashlib.sha256).hexdigest()


def sign(secret: bytes, body: bytes, timestamp: int, *, event: str, delivery_id: str) -> str:
    """The ``X-Dsocr-Signature`` value for ``body`` of delivery ``delivery_id`` of ``event``, sent at
    ``timestamp`` (unix seconds)."""
    return f"t={timestamp},{SCHEME}={_mac(secret, body, timestamp, event=event, delivery_id=delivery_id)}"


def verify_signature(
    secret: bytes,
    body: bytes,
    header: str,
    *,
    event: str,
    delivery_id: str,
    tolerance_seconds: float = SIGNATURE_TOLERANCE_SECONDS,
    now: float | None = None,
) -> bool:
    """Whether ``header`` signs ``body``, ``event`` and ``delivery_id`` with ``secret`` (scheme
    ``v2``) within ``tolerance_seconds`` of ``now``. Any malformed header is ``False``, never an
    exception: a part without ``=``, a repeated or missing field, a ``t`` that is not a few ASCII
    digits, a signature that is not 64 hex digits."""
    fields: dict[str, str] = {}
    for part in header.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep or name in fields:
            return False  # a repeated field could hide a second signature behind the first
        fields[name] = value
    timestamp, given = fields.get("t", ""), fields.get(SCHEME, "")
    # ASCII digits only (str.isdigit accepts "²", which int refuses), and few of them.
    if not (timestamp.isascii() and timestamp.isdigit()) or len(timestamp) > 12:
        return False
    if not (len(given) == 64 and given.isascii() and all(c in "0123456789abcdef" for c in given)):
        return False
    if abs((time.time() if now is None else now) - int(timestamp)) > tolerance_seconds:
        return False
    expected = _mac(secret, body, int(timestamp), event=event, delivery_id=delivery_id)
    return hmac.compare_digest(expected, given)


async def check_callback_url(url: str, *, allow_private: bool) -> None:
    """Refuse, at submit, a callback whose host does not resolve or resolves to a non-public address.

    The same rule as URL tasks (``is_public_address``); ``allow_private`` lifts it. Delivery checks
    again at connect time, so a host that changes its answer later is still refused then.
    Raises ``UrlNotAllowed``.
    """
    if allow_private:
        return
    parsed = httpx.URL(url)
    try:
        infos = await anyio.getaddrinfo(parsed.host, parsed.port or 443, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise UrlNotAllowed(f"the callback_url host {parsed.host} cannot be resolved") from exc
    if not all(is_public_address(str(info[4][0])) for info in infos):
        raise UrlNotAllowed(
            f"the callback_url host {parsed.host} resolves to a non-public address; webhooks cannot go there"
        )


@dataclass(frozen=True)
class Attempt:
    """One try of a delivery: the receiver's status if it answered, else what went wrong."""

    number: int
    status_code: int | None
    error: str | None
    permanent: bool = False  # another try cannot succeed (the address is not allowed)

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


class WebhookSender:
    """Delivers signed webhooks with retries; one instance serves the whole service (each delivery
    brings the secret it is signed with: its tenant's, or the service's)."""

    def __init__(
        self,
        *,
        allow_private: bool,
        timeout_seconds: float,
        max_attempts: int,
        backoff_seconds: float,
        user_agent: str,
    ) -> None:
        self.allow_private = allow_private
        self._timeout = timeout_seconds  # the deadline of one try, from connecting to the answer's headers
        self._max_attempts = max_attempts
        self._backoff_seconds = backoff_seconds
        self._user_agent = user_agent

    async def deliver(
        self,
        url: str,
        body: bytes,
        *,
        secret: bytes,
        event: str,
        delivery_id: str,
        on_attempt: Callable[[Attempt], Awaitable[None]],
    ) -> Attempt:
        """POST ``body``, signed with ``secret``, until the receiver answers 2xx or the tries run
        out; returns the last try.

        ``on_attempt`` is awaited after every try (to record progress). A host that resolves to a
        non-public address ends the delivery at once: trying again cannot make it allowed.
        """
        client = httpx.AsyncClient(
            transport=GuardedTransport(allow_private=self.allow_private),
            timeout=self._timeout,
            trust_env=False,  # no proxy or .netrc from the environment may redirect or credential this
            follow_redirects=False,  # a signed body goes to the URL the task named, nowhere else
        )
        async with client:
            number = 1
            while True:
                attempt = await self._try(client, url, body, secret, event, delivery_id, number)
                await on_attempt(attempt)
                if attempt.delivered or attempt.permanent or number >= self._max_attempts:
                    return attempt
                delay = min(self._backoff_seconds * 2 ** (number - 1), MAX_BACKOFF_SECONDS)
                log.info(
                    "webhook %s try %d failed (%s); trying again in %.1f s",
                    delivery_id,
                    number,
                    attempt.error,
                    delay,
                )
                await asyncio.sleep(delay)
                number += 1

    async def _try(
        self,
        client: httpx.AsyncClient,
        url: str,
        body: bytes,
        secret: bytes,
        event: str,
        delivery_id: str,
        number: int,
    ) -> Attempt:
        headers = {
            "Content-Type": "application/json",
            "User-Agent": self._user_agent,
            "Accept-Encoding": "identity",  # nothing to decompress: the body is not read anyway
            EVENT_HEADER: event,
            DELIVERY_HEADER: delivery_id,
            SIGNATURE_HEADER: sign(secret, body, int(time.time()), event=event, delivery_id=delivery_id),
        }
        try:
            with anyio.fail_after(self._timeout):
                # Streamed, and closed unread: leaving the block drops the connection with the body.
                async with client.stream("POST", url, content=body, headers=headers) as response:
                    status = response.status_code
        except UrlNotAllowed as exc:
            return Attempt(number, None, f"not delivered: {exc.message}", permanent=True)
        except (TimeoutError, httpx.TimeoutException):
            return Attempt(number, None, f"no answer within {self._timeout:g} s")
        except httpx.HTTPError as exc:
            return Attempt(number, None, f"cannot reach the receiver: {exc}")
        if 200 <= status < 300:
            return Attempt(number, status, None)
        return Attempt(number, status, f"the receiver answered {status}")
