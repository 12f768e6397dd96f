"""Routes of ``/v1/tasks`` and ``POST /v1/convert``: create, list, read, follow, cancel (a task's
results are served by ``app.api.results``)."""

from __future__ import annotations

import contextlib
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from app.api.deps import (
    ApiKeyDep,
    CallerDep,
    CountRejectionsDep,
    HeldStreamDep,
    IntakeDep,
    SettingsDep,
    StreamCapsDep,
    TasksDep,
)
from app.api.results import DownloadsDep, MeterDep, TaskId, result_response
from app.api.sse import event_stream
from app.api.stream_caps import CLIENT_CLOSED_REQUEST, HeldKind, unless_disconnected
from app.records import TaskOptions, TaskStatus
from app.schemas import ErrorBody, TaskCreate
from app.tasks.events import parse_last_event_id
from app.tasks.intake import Intake
from app.tasks.service import Created, TaskService
from app.views import TaskList, TaskView

router = APIRouter(prefix="/v1/tasks", tags=["tasks"], dependencies=[ApiKeyDep])
convert_router = APIRouter(prefix="/v1", tags=["tasks"], dependencies=[ApiKeyDep])

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 404, 409, 413, 415, 422, 429, 503)
}
_UPLOAD_FORM: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary", "description": "PDF or image"},
                        "options": {"type": "string", "description": "TaskOptions as JSON"},
                        **{name: {"type": "string"} for name in TaskOptions.model_fields},
                    },
                }
            }
        },
    }
}
_CREATED = {
    200: {"model": TaskView, "description": "An Idempotency-Key retry: the task the first request created."},
    **_ERRORS,
}
CONVERT_WAIT_SECONDS = 30  # default of POST /v1/convert's ``wait``
CONVERT_MAX_WAIT_SECONDS = 300

IdempotencyKey = Annotated[
    str | None,
    Header(
        max_length=255,
        pattern=r"^[\x21-\x7e]+$",
        description="Retry-safe create: the same key and the same request within 24 h return the "
        "first task (200) instead of a second one; the key with another request is refused (422).",
    ),
]


async def _create_from_upload(
    request: Request, intake: Intake, caller: str | None, key: str | None
) -> Created:
    """Create from the request's multipart body, streamed to the intake as it arrives (never read
    whole here: Starlette's own form parsing would spool it all before any limit applies)."""
    return await intake.from_upload(
        request.headers.get("content-type"),
        request.headers.get("content-length"),
        request.stream(),
        owner=caller,
        idempotency_key=key,
    )


async def _accepted(tasks: TaskService, created: Created, response: Response) -> TaskView:
    if created.replayed:
        response.status_code = status.HTTP_200_OK
        response.headers["Idempotent-Replayed"] = "true"
    return await tasks.view(created.record)


@router.post(
    "/upload",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=TaskView,
    responses=_CREATED,
    openapi_extra=_UPLOAD_FORM,
    dependencies=[CountRejectionsDep],
)
async def upload_task(
    request: Request,
    response: Response,
    intake: IntakeDep,
    tasks: TasksDep,
    caller: CallerDep,
    idempotency_key: IdempotencyKey = None,
) -> TaskView:
    """Upload a PDF or image (multipart field ``file``) and queue it for OCR."""
    created = await _create_from_upload(request, intake, caller, idempotency_key)
    return await _accepted(tasks, created, response)


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=TaskView,
    responses=_CREATED,
    dependencies=[CountRejectionsDep],
)
async def create_task(
    body: TaskCreate,
    response: Response,
    intake: IntakeDep,
    tasks: TasksDep,
    caller: CallerDep,
    idempotency_key: IdempotencyKey = None,
) -> TaskView:
    """Fetch a PDF or image from a URL and queue it for OCR."""
    url = str(body.url)
    created = await intake.from_url(url, body.options, owner=caller, idempotency_key=idempotency_key)
    return await _accepted(tasks, created, response)


@router.get("", response_model=TaskList, responses=_ERRORS)
async def list_tasks(
    tasks: TasksDep,
    caller: CallerDep,
    status_: Annotated[TaskStatus | None, Query(alias="status", description="Only tasks in this status.")] = (
        None
    ),
    limit: Annotated[int, Query(ge=1, le=100, description="Tasks per page.")] = 20,
    cursor: Annotated[str | None, Query(max_length=100, description="A previous page's next_cursor.")] = None,
) -> TaskList:
    """List your tasks, newest first, a page at a time."""
    return await tasks.list_tasks(owner=caller, status=status_, limit=limit, cursor=cursor)


@router.get("/{task_id}", response_model=TaskView, responses=_ERRORS)
async def read_task(
    request: Request,
    task_id: TaskId,
    tasks: TasksDep,
    caps: StreamCapsDep,
    caller: CallerDep,
    wait: Annotated[
        float,
        Query(
            ge=0,
            le=60,
            description="Seconds to wait for the task to end before answering; a wait counts "
            "toward APP_MAX_STREAMS_PER_KEY and APP_MAX_STREAMS_TOTAL (429 past them).",
        ),
    ] = 0,
) -> TaskView | Response:
    """Read a task's status, progress and links; with ``wait``, once it ends (or the wait is over)."""
    if not wait:
        return _view_json(await tasks.view(await tasks.get(task_id, caller)))
    with caps.hold(caller, HeldKind.WAIT):
        record = await unless_disconnected(request.receive, tasks.wait(task_id, owner=caller, seconds=wait))
    if record is None:  # the client left: nobody reads the answer
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return _view_json(await tasks.view(record))


def _view_json(view: TaskView) -> Response:
    """``view`` as the JSON FastAPI would send for ``response_model=TaskView``, without its second
    validation of a model that is already one: status polls are the most frequent request, and
    while a task runs they share the process (and its GIL) with the model."""
    return Response(view.model_dump_json(by_alias=True), media_type="application/json")


@router.delete("/{task_id}", response_model=TaskView, responses=_ERRORS)
async def cancel_task(task_id: TaskId, tasks: TasksDep, caller: CallerDep) -> TaskView:
    """Cancel a queued task, or a running one at its next page."""
    return await tasks.view(await tasks.cancel(task_id, caller))


@router.get(
    "/{task_id}/events",
    response_class=Response,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "status, page and end events"},
        204: {"description": "Last-Event-ID was the task's end already: nothing follows"},
        **_ERRORS,
    },
    dependencies=[HeldStreamDep],  # 429 past APP_MAX_STREAMS_PER_KEY or APP_MAX_STREAMS_TOTAL
)
async def stream_task_events(
    task_id: TaskId,
    tasks: TasksDep,
    settings: SettingsDep,
    caller: CallerDep,
    last_event_id: Annotated[
        str | None,
        Header(
            description="The id of the last event received, to resume; an id this service did not send "
            "starts the stream afresh, from the task's current state."
        ),
    ] = None,
) -> Response:
    """Follow a task as Server-Sent Events: each status change and finished page, then its end."""
    after = parse_last_event_id(last_event_id)
    events = await tasks.follow(task_id, owner=caller, last_event_id=after)
    if events is None:  # 204 is how SSE tells a client (EventSource) to stop reconnecting
        return Response(status_code=status.HTTP_204_NO_CONTENT)
    return event_stream(events, ping_seconds=settings.events_ping_seconds)


_CONVERT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            **_UPLOAD_FORM["requestBody"]["content"],
            "application/json": {"schema": {"$ref": "#/components/schemas/TaskCreate"}},
        },
    }
}


@convert_router.post(
    "/convert",
    response_model=None,
    responses={
        200: {
            "description": "result.json when the task succeeded within wait; the task view when it "
            "failed or was canceled within wait (see its status and error)"
        },
        202: {"model": TaskView, "description": "the task view: still queued or running after wait"},
        **_ERRORS,
    },
    openapi_extra=_CONVERT_BODY,
    dependencies=[CountRejectionsDep],
)
async def convert_document(
    request: Request,
    intake: IntakeDep,
    tasks: TasksDep,
    downloads: DownloadsDep,
    meter: MeterDep,
    caps: StreamCapsDep,
    caller: CallerDep,
    idempotency_key: IdempotencyKey = None,
    wait: Annotated[
        float,
        Query(
            ge=0,
            le=CONVERT_MAX_WAIT_SECONDS,
            description="Seconds to wait for the result; a wait counts toward APP_MAX_STREAMS_PER_KEY "
            "and APP_MAX_STREAMS_TOTAL (429 past them, before the document is read).",
        ),
    ] = CONVERT_WAIT_SECONDS,
) -> Response:
    """Convert in one call: upload (multipart) or URL (JSON), answered with result.json when done in time.

    200 with result.json when the task succeeds within ``wait`` seconds; 200 with the task view when
    it fails or is canceled within them (its ``status`` and ``error`` say so); 202 with the task view
    while it is still queued or running: follow it at its ``links.self``.
    """
    # Held from before the document is read: a refusal past the cap must not leave a task behind.
    with caps.hold(caller, HeldKind.WAIT) if wait else contextlib.nullcontext():
        created = await _create_any(request, intake, caller, idempotency_key)
        waiting = tasks.wait(created.record.task_id, owner=caller, seconds=wait)
        record = await unless_disconnected(request.receive, waiting)
    if record is None:  # the client left: the task stays queued, nobody reads the answer
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    headers = {"Idempotent-Replayed": "true"} if created.replayed else None
    if record.status is TaskStatus.SUCCEEDED:
        # Always the body itself: a 307 would send the client's POST on to the bucket.
        return await result_response(downloads, record, "result.json", headers, meter=meter, redirect=False)
    code = status.HTTP_200_OK if record.status.is_final else status.HTTP_202_ACCEPTED
    view = await tasks.view(record)
    return JSONResponse(view.model_dump(mode="json", by_alias=True), code, headers)


async def _create_any(request: Request, intake: Intake, caller: str | None, key: str | None) -> Created:
    """Create from a multipart upload or from a JSON body naming a URL, by the request's type."""
    if request.headers.get("content-type", "").lower().startswith("multipart/"):
        return await _create_from_upload(request, intake, caller, key)
    try:
        body = TaskCreate.model_validate_json(await request.body())
    except ValidationError as exc:  # answered as FastAPI answers a bad JSON body: 422 invalid_request
        raise RequestValidationError(exc.errors()) from exc
    return await intake.from_url(str(body.url), body.options, owner=caller, idempotency_key=key)
