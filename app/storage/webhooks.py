"""Signed webhooks: POSTing a finished task's view to its ``callback_url``.

Every try sends the same JSON body with these headers::

    Content-Type: application/json
    X-Dsocr-Event: task.succeeded | task.failed | task.canceled
    X-Dsocr-Delivery: <id, the same on every try of one delivery>
    X-Dsocr-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, f"{t}.{body}")>

A receiver recomputes the HMAC over ``t``, a dot and the raw body, compares in constant time, and
refuses a ``t`` far from its clock (replays); ``verify_signature`` is the reference. A 2xx answer
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


def sign(secret: bytes, body: bytes, timestamp: int) -> str:
    """The ``X-Dsocr-Signature`` value for ``body`` sent at ``timestamp`` (unix seconds)."""
    mac = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify_signature(
    secret: bytes,
    body: bytes,
    header: str,
    *,
    tolerance_seconds: float = SIGNATURE_TOLERANCE_SECONDS,
    now: float | None = None,
) -> bool:
    """Whether ``header`` signs ``body`` with ``secret`` within ``tolerance_seconds`` of ``now``."""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    timestamp, given = fields.get("t", ""), fields.get("v1", "")
    # ASCII digits only (str.isdigit accepts "²", which int refuses), and few of them.
    if not (timestamp.isascii() and timestamp.isdigit()) or len(timestamp) > 12 or not given:
        return False
    if abs((time.time() if now is None else now) - int(timestamp)) > tolerance_seconds:
        return False
    expected = sign(secret, body, int(timestamp)).split("v1=", 1)[1]
    return hmac.compare_digest(expected.encode(), given.encode())


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
    """Delivers signed webhooks with retries; one instance serves the whole service."""

    def __init__(
        self,
        *,
        secret: bytes,
        allow_private: bool,
        timeout_seconds: float,
        max_attempts: int,
        backoff_seconds: float,
        user_agent: str,
    ) -> None:
        self._secret = secret
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
        event: str,
        delivery_id: str,
        on_attempt: Callable[[Attempt], Awaitable[None]],
    ) -> Attempt:
        """POST ``body`` until the receiver answers 2xx or the tries run out; returns the last try.

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
                attempt = await self._try(client, url, body, event, delivery_id, number)
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
        self, client: httpx.AsyncClient, url: str, body: bytes, event: str, delivery_id: str, number: int
    ) -> Attempt:
        headers = {
            "Content-Type": "application/json",
            "User-Agent": self._user_agent,
            "Accept-Encoding": "identity",  # nothing to decompress: the body is not read anyway
            EVENT_HEADER: event,
            DELIVERY_HEADER: delivery_id,
            SIGNATURE_HEADER: sign(self._secret, body, int(time.time())),
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
