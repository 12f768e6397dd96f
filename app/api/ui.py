"""The web console: static files under ``/ui`` with a strict Content-Security-Policy, and the route
it renders result pages with (``app.api.rendered``).

The console is plain ES modules, HTML and CSS in ``app/ui/``: no build step, no third-party code,
nothing fetched from elsewhere. Its only dynamic HTML is what ``app.render`` sanitised on the
server, so the policy can forbid inline script and style outright.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

from app.api import rendered

UI_DIR = Path(__file__).resolve().parent.parent / "ui"
CONSOLE_PATH = "/ui"

CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' blob: data:",  # page images and figures arrive as blobs (fetched with the key)
        "connect-src 'self'",
        "font-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",  # frame-ancestors for browsers that predate it
    # Revalidate every time (a 304 is cheap): an upgraded service must not run last version's modules.
    "Cache-Control": "no-cache",
}


class ConsoleFiles(StaticFiles):
    """``StaticFiles`` that sends the console's security headers with every file."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(SECURITY_HEADERS)
        return response


def install_console(app: FastAPI) -> None:
    """Serve the console at ``/ui/`` and add the page-rendering route it reads results through."""
    app.include_router(rendered.router)
    app.mount(CONSOLE_PATH, ConsoleFiles(directory=UI_DIR, html=True), name="console")
