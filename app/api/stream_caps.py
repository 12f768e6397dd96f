"""Caps on the connections clients hold open: event streams and long-polls.

An open ``GET /v1/tasks/{id}/events``, ``GET /v1/tasks/{id}?wait=`` or ``POST /v1/convert?wait=``
holds a socket and a coroutine for as long as it lasts and, with ``APP_QUEUE_BACKEND=redis``, a
connection of the process's bounded Redis pool (its ``XREAD BLOCK``). ``StreamCaps`` admits one
only while its caller holds fewer than ``APP_MAX_STREAMS_PER_KEY`` and the process fewer than
``APP_MAX_STREAMS_TOTAL``; past either it is refused with 429 ``too_many_connections`` (with
``Retry-After``) before anything is streamed, waited on or read from Redis. Its slot comes back
when the stream or the wait ends, when the request fails, and when the client hangs up.

"Per key" is per owner id: a tenant's (``app.tenants``: every key of a tenant shares its count),
whose own ``event_streams`` limit replaces ``APP_MAX_STREAMS_PER_KEY`` where the tenants file sets
one. With auth off every caller is the one anonymous owner (``None``), so
``APP_MAX_STREAMS_PER_KEY`` bounds all of them together. A refusal carries the IETF RateLimit
fields (``app.api.errors.rate_limit_headers``) naming the limit.

The caps live in ``api``, not ``tasks``: what they count is HTTP connections held by callers, not
tasks. The count is this process's own, like the Redis pool it protects
(``app.storage.redis_conn`` sizes that pool from ``APP_MAX_STREAMS_TOTAL``); each API replica
admits up to its own total.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Coroutine, Iterator
from enum import StrEnum
from typing import Any, TypeVar

from starlette.types import Receive

from app.errors import TooManyConnections
from app.metrics import Metrics
from app.tenants import Tenants

T = TypeVar("T")

# Streams end when their tasks do and long-polls within a minute; a refused client tries again then.
RETRY_AFTER_SECONDS = 5
# The status nginx logs for a request whose client left before the answer: nobody reads it, but the
# HTTP metrics then count hang-ups apart from answers.
CLIENT_CLOSED_REQUEST = 499


class HeldKind(StrEnum):
    """What holds the connection; the ``kind`` label of ``dsocr_streams_open``."""

    EVENTS = "events"  # GET /v1/tasks/{id}/events
    WAIT = "wait"  # a long-poll: GET /v1/tasks/{id}?wait=, POST /v1/convert?wait=


class StreamCaps:
    """Counts the event streams and long-polls held open in this process, per owner and in all.

    Used from the event loop only: ``hold`` checks and counts without awaiting in between, so two
    requests can never both take the last slot.
    """

    def __init__(self, *, per_key: int, total: int, metrics: Metrics, tenants: Tenants | None = None) -> None:
        """``tenants``: where a caller's own ``event_streams`` limit is looked up (at each ``hold``,
        so a reloaded tenants file applies to the next stream)."""
        self.per_key = per_key
        self.total = total
        self._tenants = tenants
        self._held: collections.Counter[str | None] = collections.Counter()
        self._open = metrics.streams_open
        self._refused = metrics.streams_refused

    @property
    def held(self) -> int:
        """Streams and long-polls held now, all owners together."""
        return self._held.total()

    @contextlib.contextmanager
    def hold(self, owner: str | None, kind: HeldKind) -> Iterator[None]:
        """Hold one of ``owner``'s slots for the ``with`` block, however it ends.

        Raises ``TooManyConnections``, holding nothing, when ``owner`` (``None``: auth is off) holds
        its limit already (its tenant's ``event_streams``, else ``per_key``) or the process ``total``.
        """
        tenant = self._tenants.by_owner(owner) if self._tenants is not None else None
        own_limit = tenant.limits.event_streams if tenant is not None else None
        limit = own_limit if own_limit is not None else self.per_key
        if self._held[owner] >= limit:
            self._refused.labels("per_key").inc()
            if own_limit is not None:
                assert tenant is not None
                who, setting = f"tenant {tenant.name!r}", "event_streams in APP_TENANTS_FILE"
            else:
                who = "this API key" if owner is not None else "anonymous callers (auth is off)"
                setting = "APP_MAX_STREAMS_PER_KEY"
            raise TooManyConnections(
                f"{who} already hold(s) {limit} event streams and long-polls, the limit ({setting}); "
                "close one or retry later",
                limit="event_streams",
                quota=limit,
                retry_after=RETRY_AFTER_SECONDS,
            )
        if self.held >= self.total:
            self._refused.labels("total").inc()
            raise TooManyConnections(
                f"this server holds {self.total} event streams and long-polls already, its limit "
                "(APP_MAX_STREAMS_TOTAL); retry later",
                limit="streams_total",
                quota=self.total,
                retry_after=RETRY_AFTER_SECONDS,
            )
        self._held[owner] += 1
        gauge = self._open.labels(kind.value)
        gauge.inc()
        try:
            yield
        finally:
            gauge.dec()
            self._held[owner] -= 1
            if not self._held[owner]:
                del self._held[owner]  # an owner holding nothing takes no memory


async def unless_disconnected(receive: Receive, waiting: Coroutine[Any, Any, T]) -> T | None:
    """``waiting``'s result, or ``None`` when the client hangs up first.

    ``waiting`` is then cancelled, so a long-poll that nobody will read gives back its slot (and
    its Redis connection) at once, not at the end of its ``wait``. ``receive`` is the request's
    ASGI channel; call this only once the request's body has been read, as it consumes what
    ``receive`` gives until the disconnect. Errors of ``waiting`` are raised as they are.
    """
    work = asyncio.ensure_future(waiting)
    hangup = asyncio.ensure_future(_hangup(receive))
    try:
        await asyncio.wait((work, hangup), return_when=asyncio.FIRST_COMPLETED)
    finally:
        work.cancel()  # nothing when it is done
        hangup.cancel()
        # Both have stopped before the answer goes out: nothing of this request outlives it.
        await asyncio.wait((work, hangup))
        if not hangup.cancelled():
            hangup.exception()  # retrieved: a receive that broke counts as the hang-up it is
    if work.cancelled():
        return None
    return work.result()


async def _hangup(receive: Receive) -> None:
    """Return once the client has disconnected (after the body, ``receive`` waits for that)."""
    while (await receive())["type"] != "http.disconnect":
        pass
