"""The HTTP edge: routers that parse, call one service method and shape the answer, and the ASGI
middleware in front of them. Nothing below ``app.api`` imports it.

- ``tasks``: create, list, read, follow, cancel (``/v1/tasks``) and ``POST /v1/convert``
- ``results``: downloads of a task's files, previews, the zip, share links, publish
- ``links``: the key-less share-link route; ``rendered``: a page as safe HTML; ``system``:
  ``/healthz``, ``/readyz``, ``/metrics``; ``ui``: the web console
- ``deps``: authentication and the dependency aliases; ``errors``: the error tree to status codes
- ``body_limits``, ``http_metrics``: ASGI middleware; ``stream_caps``: held streams and long-polls
- ``sse``: the event-stream response
"""

# Modules, not names: ``main`` imports the routers it mounts. Listed here so the package says what
# it offers without importing all of it.
__all__ = [
    "body_limits",
    "deps",
    "errors",
    "http_metrics",
    "links",
    "rendered",
    "results",
    "sse",
    "stream_caps",
    "system",
    "tasks",
    "ui",
]
