"""The public API's shapes: request bodies, share links and the error body (the task
view and the task list are ``app.views``: the task layer builds them)."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field, HttpUrl

from app.records import TaskOptions


class TaskCreate(BaseModel):
    """Body of ``POST /v1/tasks``: a document to fetch from a URL."""

    url: HttpUrl = Field(description="http(s) URL of a PDF or image; private addresses are refused.")
    options: TaskOptions = Field(default_factory=TaskOptions)


class LinkCreate(BaseModel):
    """Body of ``POST /v1/tasks/{id}/links``: which result file to share, and for how long."""

    file: str = Field(
        max_length=64,
        description='"full.md", "layout.json", "result.json", "result.zip" or "images/<name>".',
    )
    expires_in: int | None = Field(
        default=None, gt=0, description="Seconds the link works; default APP_LINK_EXPIRE_SECONDS."
    )


class LinkView(BaseModel):
    """A share link: works without an API key, for one file, until ``expires_at``."""

    file: str
    url: str = Field(description="Absolute with APP_LINK_BASE_URL set, else relative to the service root.")
    expires_at: datetime


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable machine-readable code, e.g. queue_full.")
    message: str = Field(description="What went wrong and what to do, for people.")


class ErrorBody(BaseModel):
    """Every error response has this shape."""

    error: ErrorDetail
