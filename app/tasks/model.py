"""The task record: what is stored in ``task.json`` and what every component reads and updates."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.pipeline.pages import validate_page_spec
from app.pipeline.sniff import DocumentKind

TASK_ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")

Mode = Literal["document", "free", "figure", "describe"]
Resolution = Literal["tiny", "small", "base", "large", "gundam"]


class TaskStatus(StrEnum):
    """Where a task is in its life; the last three are final."""

    QUEUED = "queued"  # accepted and stored, waiting for a worker (or for GPU memory)
    RUNNING = "running"  # a worker is rendering and recognising its pages
    SUCCEEDED = "succeeded"  # results are stored and downloadable
    FAILED = "failed"  # stopped by an error recorded on the task
    CANCELED = "canceled"  # stopped at the user's request

    @property
    def is_final(self) -> bool:
        return self in (TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELED)


class TaskOptions(BaseModel):
    """What the user asked for; validated at submit so a task never fails on its own options."""

    model_config = ConfigDict(extra="forbid")

    mode: Mode = Field(
        default="document",
        description="document: Markdown with layout; free: plain OCR; figure: parse a chart; "
        "describe: a caption",
    )
    prompt: str | None = Field(default=None, max_length=4000, description="Replaces the mode's prompt.")
    pages: str | None = Field(default=None, max_length=1000, description='1-based pages, e.g. "1-3,7".')
    dpi: int = Field(default=144, ge=36, description="PDF render resolution (dots per inch).")
    resolution: Resolution | None = Field(
        default=None, description="The model's published size modes; gundam tiles large pages."
    )
    base_size: int | None = Field(default=None, ge=256, le=2048, description="Global view in px (v1).")
    image_size: int | None = Field(default=None, ge=256, le=2048, description="Tile size in px (v1).")
    crop_mode: bool | None = Field(default=None, description="Tile large pages.")

    @field_validator("pages")
    @classmethod
    def _check_pages(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        validate_page_spec(value)
        return value.strip()


class Progress(BaseModel):
    pages_done: int = 0
    pages_total: int = 0


class TaskErrorInfo(BaseModel):
    code: str
    message: str


class SourceInfo(BaseModel):
    filename: str
    content_type: str
    size_bytes: int
    pages: int  # pages (or image frames) in the document, before the ``pages`` selection
    url: str | None = None  # where a URL task was fetched from


class TaskRecord(BaseModel):
    """One task, as stored in ``task.json``. Only the task service and its worker change it."""

    task_id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    status: TaskStatus = TaskStatus.QUEUED
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    started_at: datetime | None = None
    finished_at: datetime | None = None
    progress: Progress = Field(default_factory=Progress)
    error: TaskErrorInfo | None = None
    source: SourceInfo
    options: TaskOptions
    page_numbers: list[int]  # the selected 1-based pages, in processing order
    input_name: str  # file name of the stored input under input/
    input_kind: DocumentKind  # what the input's bytes are, sniffed at submit
    waiting_reason: str | None = None  # why a queued task has not started (e.g. GPU memory)
    cancel_requested: bool = False
    attempts: int = 0  # how many times a worker started it (restarts included)
    model: str | None = None  # the checkpoint that produced the result
    images: list[str] = Field(default_factory=list)  # figure crops under images/, once succeeded
    truncated_pages: list[int] = Field(default_factory=list)  # pages that never reached the end marker

    @property
    def duration_seconds(self) -> float | None:
        if self.started_at is None:
            return None
        end = self.finished_at or datetime.now(UTC)
        return (end - self.started_at).total_seconds()
