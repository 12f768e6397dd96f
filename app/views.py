"""The task as clients see it: the view ``GET /v1/tasks/{id}`` answers, every event carries, and
``result.json`` and webhooks start from. Built from the record alone (plus a queue estimate), so
every layer that tells a client about a task can build it without reaching up to the API."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from app.records import (
    Progress,
    PublishState,
    QueueEstimate,
    SourceInfo,
    TaskErrorInfo,
    TaskOptions,
    TaskRecord,
    TaskStatus,
    WebhookState,
)


class TaskLinks(BaseModel):
    """Where the results are, relative to the service root; present once the task succeeded."""

    self: str
    markdown: str | None = None
    json_: str | None = Field(default=None, alias="json")
    layout: str | None = None
    zip: str | None = None
    chunks: str | None = None  # chunks.json with the default limits; see the route for others
    html: str | None = None
    docx: str | None = None
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
    suspect_pages: int = Field(
        default=0,
        description="Pages done so far that are still suspect after the retry ladder; each page's "
        "quality in result.json says why.",
    )
    retries: int = Field(default=0, description="Retry attempts the pages done so far needed, summed.")
    model: str | None
    links: TaskLinks
    publish: PublishState | None = Field(
        default=None, description="The latest publish to object storage (or of share links), with its links."
    )
    webhook: WebhookState | None = Field(default=None, description="Delivery of the callback_url webhook.")
    queue_position: int | None = Field(
        default=None, description="1 = the next task to start; null unless the task is queued."
    )
    estimated_start_at: datetime | None = Field(
        default=None,
        description="When a queued task should start, from the measured seconds per page of the tasks "
        "ahead; null until a page was timed, or unless queued.",
    )
    estimated_end_at: datetime | None = Field(
        default=None, description="When a queued task should end, likewise; null unless queued."
    )

    @classmethod
    def from_record(cls, record: TaskRecord, estimate: QueueEstimate | None = None) -> TaskView:
        """The view of ``record``; ``estimate`` (from the task service) fills the queue fields."""
        base = f"/v1/tasks/{record.task_id}"
        links = TaskLinks(self=base)
        if record.status is TaskStatus.SUCCEEDED:
            links = TaskLinks(
                self=base,
                markdown=f"{base}/result.md",
                json=f"{base}/result.json",
                layout=f"{base}/layout.json",
                zip=f"{base}/result.zip",
                chunks=f"{base}/chunks.json",
                html=f"{base}/result.html",
                docx=f"{base}/result.docx",
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
            suspect_pages=record.suspect_pages,
            retries=record.retries,
            model=record.model,
            links=links,
            publish=record.publish,
            webhook=record.webhook,
            queue_position=estimate.position if estimate else None,
            estimated_start_at=estimate.start_at if estimate else None,
            estimated_end_at=estimate.end_at if estimate else None,
        )


class TaskList(BaseModel):
    """A page of ``GET /v1/tasks``, newest first."""

    tasks: list[TaskView]
    next_cursor: str | None = Field(
        description="Pass as ``cursor`` for the next (older) page; null on the last page."
    )
