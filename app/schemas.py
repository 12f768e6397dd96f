"""The public API's shapes: requests, the task view and the error body."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field, HttpUrl

from app.tasks.model import Progress, SourceInfo, TaskErrorInfo, TaskOptions, TaskRecord, TaskStatus


class TaskCreate(BaseModel):
    """Body of ``POST /v1/tasks``: a document to fetch from a URL."""

    url: HttpUrl = Field(description="http(s) URL of a PDF or image; private addresses are refused.")
    options: TaskOptions = Field(default_factory=TaskOptions)


class TaskLinks(BaseModel):
    """Where the results are, relative to the service root; present once the task succeeded."""

    self: str
    markdown: str | None = None
    json_: str | None = Field(default=None, alias="json")
    layout: str | None = None
    images: list[str] = Field(default_factory=list)

    model_config = {"populate_by_name": True}


class TaskView(BaseModel):
    """A task as clients see it."""

    task_id: str
    status: TaskStatus
    progress: Progress
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    duration_seconds: float | None
    error: TaskErrorInfo | None
    waiting_reason: str | None
    source: SourceInfo
    options: TaskOptions
    pages: list[int] = Field(description="The selected 1-based page numbers.")
    truncated_pages: list[int] = Field(description="Pages that never reached the end marker.")
    model: str | None
    links: TaskLinks

    @classmethod
    def from_record(cls, record: TaskRecord) -> TaskView:
        base = f"/v1/tasks/{record.task_id}"
        links = TaskLinks(self=base)
        if record.status is TaskStatus.SUCCEEDED:
            links = TaskLinks(
                self=base,
                markdown=f"{base}/result.md",
                json=f"{base}/result.json",
                layout=f"{base}/layout.json",
                images=[f"{base}/images/{name}" for name in record.images],
            )
        return cls(
            task_id=record.task_id,
            status=record.status,
            progress=record.progress,
            created_at=record.created_at,
            started_at=record.started_at,
            finished_at=record.finished_at,
            duration_seconds=record.duration_seconds,
            error=record.error,
            waiting_reason=record.waiting_reason,
            source=record.source,
            options=record.options,
            pages=record.page_numbers,
            truncated_pages=record.truncated_pages,
            model=record.model,
            links=links,
        )


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable machine-readable code, e.g. queue_full.")
    message: str = Field(description="What went wrong and what to do, for people.")


class ErrorBody(BaseModel):
    """Every error response has this shape."""

    error: ErrorDetail
