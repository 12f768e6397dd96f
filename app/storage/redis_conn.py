"""Connections to Redis for the scale-out mode, and what a lost connection becomes.

One URL (``APP_REDIS_URL``), two clients: a blocking one for the store (its callers run in
threads) and an asyncio one for the queue and the event streams (blocking reads there must not
hold a thread each). Both retry a dropped connection with a capped exponential backoff, so a Redis
restart of a few seconds passes unnoticed; past that, calls raise ``BackendUnavailable``.
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


def sync_client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, retry=Retry(ExponentialBackoff(**BACKOFF), RETRIES), **_OPTIONS)


def async_client(url: str) -> redis.asyncio.Redis:
    return redis.asyncio.Redis.from_url(
        url, retry=AsyncRetry(ExponentialBackoff(**BACKOFF), RETRIES), **_OPTIONS
    )


@contextlib.contextmanager
def translated(what: str) -> Iterator[None]:
    """Raise ``BackendUnavailable`` naming ``what`` for a connection Redis's retries could not save."""
    try:
        yield
    except LOST as exc:
        raise BackendUnavailable(f"Redis is unreachable while {what}: {exc}") from exc
