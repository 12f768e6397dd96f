"""HTTP request metrics, labelled by route template (``/v1/tasks/{task_id}``), never the raw path."""

from __future__ import annotations

import time

from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.metrics import Metrics


class HttpMetricsMiddleware:
    """Counts requests and observes their latency; unknown paths share one label."""

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
            self.metrics.http_duration.labels(method, route).observe(time.perf_counter() - started)


def _route_template(scope: Scope) -> str:
    route = scope.get("route")
    if route is not None and hasattr(route, "path"):
        return route.path
    for candidate in scope["app"].routes if "app" in scope else ():
        match, _ = candidate.matches(scope)
        if match is Match.FULL:
            return candidate.path
    return "<unmatched>"
