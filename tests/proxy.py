"""A TCP proxy on loopback in front of the service, dropping event streams the way real proxies do.

Load balancers and reverse proxies cut long-lived responses (an idle timeout, a reload, a restart
of the upstream): the client then sees its chunked response end mid-body, and while the upstream is
away the proxy answers ``502``. ``EventStreamProxy`` does both on request, forwards everything else
byte for byte, and records what clients sent (each request's method, path and headers) and how many
keep-alive comments the event streams carried, so tests can tell a resumed stream from a fresh one.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

# make_server settings for tasks that outlast the keep-alive: several ": ping" comments per page
# (the service's default interval is 15 s, longer than a whole test).
LONGER_THAN_KEEP_ALIVE: dict[str, Any] = {"events_ping_seconds": 0.1, "page_delay": 0.4, "ds_batch_size": 1}

# An HTTP/1.1 request head: request line, header lines, blank line (RFC 9112 section 2.1).
_HEAD = re.compile(rb"(GET|POST|PUT|DELETE|HEAD|PATCH) (\S+) HTTP/1\.1\r\n((?:[^\r\n]+\r\n)*)\r\n")
_KEEP_HEAD_BYTES = 16 * 1024  # a head split across reads is still found; bodies are not kept whole
# What nginx answers when it cannot reach its upstream.
_BAD_GATEWAY = b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


@dataclass(frozen=True)
class SeenRequest:
    """One request a client sent through the proxy; header names are lower-cased."""

    method: str
    path: str
    headers: dict[str, str]

    @property
    def is_events(self) -> bool:
        return self.path.split("?", 1)[0].endswith("/events")


@dataclass(eq=False)
class _Connection:
    client: socket.socket
    upstream: socket.socket
    last_request: SeenRequest | None = None
    _head_buffer: bytearray = field(default_factory=bytearray)

    def close(self) -> None:
        """Drop both sides at once, without a final chunk: the client's response ends mid-body."""
        for sock in (self.client, self.upstream):
            with contextlib.suppress(OSError):  # already closed by the other side
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


class EventStreamProxy:
    """Forwards ``http://127.0.0.1:<port>`` to ``upstream_url``; a context manager.

    ``drop_streams`` cuts the event streams in flight (``drop_streams_when``: once a condition
    holds); ``refuse_streams`` answers the next event stream requests with ``502``. ``requests``
    lists every request seen, ``pings`` counts the ``: ping`` comments forwarded on event streams.
    """

    def __init__(self, upstream_url: str) -> None:
        host, _, port = upstream_url.removeprefix("http://").partition(":")
        self._upstream = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self.requests: list[SeenRequest] = []
        self.pings = 0
        self.dropped = 0
        self._refuse = 0
        self._connections: set[_Connection] = set()
        self._lock = threading.Lock()
        self._closed = False

    def __enter__(self) -> EventStreamProxy:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closed = True
        self._listener.close()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            connection.close()

    def events_requests(self) -> list[SeenRequest]:
        with self._lock:
            return [request for request in self.requests if request.is_events]

    def drop_streams(self) -> int:
        """Cut every event stream in flight; returns how many were cut."""
        with self._lock:
            streams = [c for c in self._connections if c.last_request and c.last_request.is_events]
            self._connections.difference_update(streams)
        for connection in streams:
            connection.close()
        return len(streams)

    def drop_streams_when(self, ready: Callable[[], object], *, refuse: int = 0) -> threading.Thread:
        """A started thread that waits (at most 60 s) for ``ready()`` to be true, then refuses the
        next ``refuse`` event stream requests and cuts the streams in flight, adding their number
        to ``dropped``; join it before asserting."""

        def drop() -> None:
            deadline = time.monotonic() + 60
            while not ready() and time.monotonic() < deadline:
                time.sleep(0.02)
            self.refuse_streams(refuse)
            cut = self.drop_streams()
            with self._lock:
                self.dropped += cut

        thread = threading.Thread(target=drop, daemon=True)
        thread.start()
        return thread

    def refuse_streams(self, count: int) -> None:
        """Answer the next ``count`` event stream requests with ``502``, as while the upstream is away."""
        with self._lock:
            self._refuse = count

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # the listener was closed
            try:
                upstream = socket.create_connection(self._upstream)
            except OSError:
                client.close()
                continue
            connection = _Connection(client, upstream)
            with self._lock:
                self._connections.add(connection)
            threading.Thread(target=self._to_upstream, args=(connection,), daemon=True).start()
            threading.Thread(target=self._to_client, args=(connection,), daemon=True).start()

    def _to_upstream(self, connection: _Connection) -> None:
        while chunk := _receive(connection.client):
            if self._refused(connection, chunk):
                connection.client.sendall(_BAD_GATEWAY)
                break
            try:
                connection.upstream.sendall(chunk)
            except OSError:
                break
        self._forget(connection)

    def _to_client(self, connection: _Connection) -> None:
        while chunk := _receive(connection.upstream):
            if connection.last_request and connection.last_request.is_events:
                with self._lock:
                    self.pings += chunk.count(b": ping")
            try:
                connection.client.sendall(chunk)
            except OSError:
                break
        self._forget(connection)

    def _refused(self, connection: _Connection, chunk: bytes) -> bool:
        """Record the request heads in ``chunk``; True when one is an event stream to refuse."""
        buffer = connection._head_buffer
        buffer += chunk
        refuse = False
        while match := _HEAD.search(buffer):
            lines = match.group(3).decode("latin-1").split("\r\n")
            headers = {
                name.strip().lower(): value.strip()
                for name, _, value in (x.partition(":") for x in lines if x)
            }
            request = SeenRequest(match.group(1).decode(), match.group(2).decode("latin-1"), headers)
            connection.last_request = request
            with self._lock:
                self.requests.append(request)
                if request.is_events and self._refuse > 0:
                    self._refuse -= 1
                    refuse = True
            del buffer[: match.end()]
        del buffer[:-_KEEP_HEAD_BYTES]
        return refuse

    def _forget(self, connection: _Connection) -> None:
        with self._lock:
            self._connections.discard(connection)
        connection.close()


def _receive(sock: socket.socket) -> bytes:
    """The next bytes from ``sock``; empty once it is closed, by its peer or by ``drop_streams``."""
    try:
        return sock.recv(65536)
    except OSError:
        return b""


def a_page_done(client: httpx.Client) -> Callable[[], bool]:
    """A condition for ``drop_streams_when``: some task of ``client``'s key has finished a page."""

    def ready() -> bool:
        tasks = client.get("/v1/tasks").json()["tasks"]
        return any(task["progress"]["pages_done"] >= 1 for task in tasks)

    return ready
