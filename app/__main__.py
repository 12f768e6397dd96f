"""``python -m app``: run the service with uvicorn, configured from ``APP_*`` settings."""

from __future__ import annotations

import uvicorn

from app.main import configure_logging, create_app, settings_from_environment


def main() -> None:
    settings = settings_from_environment()
    configure_logging(settings)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=30,
    )


if __name__ == "__main__":
    main()
