"""Connections to Redis for the scale-out mode, and what a lost connection becomes.

One URL (``APP_REDIS_URL``), two clients: a blocking one for the store (its callers run in
threads) and an asyncio one for the queue and the event streams (blocking reads there must not
hold a thread each). Both retry a dropped connection with a capped exponential backoff, so a Redis
restart of a few seconds passes unnoticed; past that, calls raise ``BackendUnavailable``.

Both pools are bounded (redis-py's ``BlockingConnectionPool``): a command finding every connection
in use waits up to ``APP_REDIS_POOL_TIMEOUT_SECONDS`` for one, then raises ``BackendUnavailable``
(503 ``backend_unavailable``), never waiting forever and never opening more. Redis's own
``maxclients`` (10,000 by default) must exceed the sum over every replica and worker of
``async_pool_size`` plus ``SYNC_MAX_CONNECTIONS``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import redis
import redis.asyncio
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from app.errors import BackendUnavailable

# About 15 s of tries (0.05 s doubling to 2 s): longer than a restart with the append-only file.
RETRIES = 12
BACKOFF = {"cap": 2.0, "base": 0.05}
SOCKET_TIMEOUT_SECONDS = 10  # a reply slower than this is a dead connection (blocking reads excepted)
CONNECT_TIMEOUT_SECONDS = 2
LOST = (RedisConnectionError, RedisTimeoutError, OSError)


# Both clients: a dropped connection or a timeout is retried with backoff before a caller sees it.
_OPTIONS: dict[str, Any] = {
    "retry_on_error": [RedisConnectionError, RedisTimeoutError],
    "socket_timeout": SOCKET_TIMEOUT_SECONDS,
    "socket_connect_timeout": CONNECT_TIMEOUT_SECONDS,
    "health_check_interval": 30,
}


# The asyncio pool, beyond the held streams: each worker loop keeps one connection in its blocking
# XREADGROUP, and its running task needs one more to renew its lease and one to publish its events.
CONNECTIONS_PER_WORKER = 3
# Short commands (submits, reads, cancels, the queue monitor, the janitor) hold a connection for
# milliseconds; more of them at once than this wait their turn in the pool.
HEADROOM_CONNECTIONS = 32
# The store's client is called from threads only: asyncio's default executor (at most 32) and
# anyio's (40). Each call holds a connection for a command or a pipeline, milliseconds: a burst
# past this many waits that long for a free one rather than opening more.
SYNC_MAX_CONNECTIONS = 48
DEFAULT_POOL_TIMEOUT_SECONDS = 5.0  # s, as APP_REDIS_POOL_TIMEOUT_SECONDS


def async_pool_size(*, streams: int, workers: int) -> int:
    """Connections of the asyncio client of a process that holds up to ``streams`` event streams
    and long-polls (``APP_MAX_STREAMS_TOTAL`` on an API process, 0 on a worker) and runs ``workers``
    worker loops (``APP_MAX_WORKERS``, 0 on an API replica).

    Every admitted stream or long-poll holds one connection in its ``XREAD BLOCK``, so the caps of
    ``app.api.stream_caps`` keep them within the pool; the rest is for the workers and headroom.
    """
    return streams + CONNECTIONS_PER_WORKER * workers + HEADROOM_CONNECTIONS


DEFAULT_ASYNC_MAX_CONNECTIONS = async_pool_size(streams=0, workers=1)  # a client that holds no streams


def sync_client(
    url: str,
    *,
    max_connections: int = SYNC_MAX_CONNECTIONS,
    pool_timeout: float = DEFAULT_POOL_TIMEOUT_SECONDS,
) -> redis.Redis:
    """The blocking client, on a pool of at most ``max_connections`` that waits ``pool_timeout`` s."""
    pool = redis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=pool_timeout,
        retry=Retry(ExponentialBackoff(**BACKOFF), RETRIES),
        **_OPTIONS,
    )
    return redis.Redis.from_pool(pool)  # closing the client closes the pool


def async_client(
    url: str,
    *,
    max_connections: int = DEFAULT_ASYNC_MAX_CONNECTIONS,
    pool_timeout: float = DEFAULT_POOL_TIMEOUT_SECONDS,
) -> redis.asyncio.Redis:
    """The asyncio client, on a pool of at most ``max_connections`` (see ``async_pool_size``) that
    waits ``pool_timeout`` s for a free connection."""
    pool = redis.asyncio.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=pool_timeout,
        retry=AsyncRetry(ExponentialBackoff(**BACKOFF), RETRIES),
        **_OPTIONS,
    )
    return redis.asyncio.Redis.from_pool(pool)  # closing the client closes the pool


@contextlib.contextmanager
def translated(what: str) -> Iterator[None]:
    """Raise ``BackendUnavailable`` naming ``what`` for a connection Redis's retries could not save."""
    try:
        yield
    except LOST as exc:
        raise BackendUnavailable(f"Redis is unreachable while {what}: {exc}") from exc
