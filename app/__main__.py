"""``python -m app``: run the service with uvicorn, configured from ``APP_*`` settings."""

from __future__ import annotations

import logging

import uvicorn

from app.config import Settings
from app.main import configure_logging, create_app, settings_from_environment

log = logging.getLogger("app")


def main() -> None:
    settings = settings_from_environment()
    configure_logging(settings)
    app = create_app(settings)
    _announce_address(settings)
    uvicorn.run(
        app,
        host=settings.listen_host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=30,
    )


def _announce_address(settings: Settings) -> None:
    """Say where the service listens when ``APP_HOST`` left it to the keys, and how to change it."""
    if settings.host is not None:
        return  # chosen explicitly: uvicorn's own start-up line says where
    if settings.api_keys or settings.tenants_file is not None:
        log.info("APP_HOST is unset: listening on every interface (0.0.0.0), API keys are required")
        return
    log.warning(
        "APP_HOST is unset and APP_API_KEYS is empty: listening on 127.0.0.1 only, so the open API is "
        "reachable from this machine alone. Set APP_API_KEYS to listen on every interface with keys "
        "required, or APP_HOST=0.0.0.0 (dsocr serve --host 0.0.0.0) to serve other machines without keys."
    )


if __name__ == "__main__":
    main()
