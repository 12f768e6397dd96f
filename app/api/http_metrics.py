"""HTTP request metrics, labelled by route template (``/v1/tasks/{task_id}``), never the raw path."""

from __future__ import annotations

import time
from urllib.parse import parse_qs

from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.metrics import Metrics

_HELD_OPEN_ROUTES = frozenset({"/v1/tasks/{task_id}/events", "/v1/convert"})  # convert waits by default


class HttpMetricsMiddleware:
    """Counts requests and observes their latency (not of event streams and long-polls); unknown
    paths share one label."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client gets if the app raises before answering

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        # Matched before the app runs: routing rewrites the scope of a request into a mount (/ui).
        path, root_path = scope["path"], scope.get("root_path", "")
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = _route_template({**scope, "path": path, "root_path": root_path})
            method = scope["method"]
            self.metrics.http_requests.labels(method, route, str(status)).inc()
            if not _held_open(route, scope):
                self.metrics.http_duration.labels(method, route).observe(time.perf_counter() - started)


def _held_open(route: str, scope: Scope) -> bool:
    """Event streams and long-polls last as long as the client asked: their time is not latency,
    and observed it would drown the latency of every other request in the histogram."""
    return route in _HELD_OPEN_ROUTES or "wait" in parse_qs(scope.get("query_string", b"").decode("latin-1"))


def _route_template(scope: Scope) -> str:
    route = scope.get("route")
    if route is not None and hasattr(route, "path"):
        return route.path
    for candidate in scope["app"].routes if "app" in scope else ():
        match, _ = candidate.matches(scope)
        if match is Match.FULL:
            return candidate.path
    return "<unmatched>"
