"""``python -m app``: run the service with uvicorn, configured from ``APP_*`` settings."""

from __future__ import annotations

import logging
import sys

import uvicorn
from pydantic import ValidationError

from app.config import Settings
from app.main import create_app


def main() -> None:
    try:
        settings = Settings()
    except ValidationError as exc:  # a setting is wrong: say which, without a traceback
        problems = "\n".join(f"  {error['msg']}" for error in exc.errors())
        sys.exit(f"dsocr-server cannot start, the settings are invalid:\n{problems}")
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=30,
    )


if __name__ == "__main__":
    main()
