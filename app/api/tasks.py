"""Routes of ``/v1/tasks`` and ``POST /v1/convert``: create, list, read, follow, cancel, download."""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, StreamingResponse
from pydantic import ValidationError

from app.api.body_limits import MAX_JSON_DEPTH, json_nesting_exceeds
from app.api.deps import (
    ApiKeyDep,
    CallerDep,
    CountRejectionsDep,
    HeldStreamDep,
    SettingsDep,
    StreamCapsDep,
    TasksDep,
)
from app.api.links import DownloadsDep, FollowUpsDep, stream_file
from app.api.sse import event_stream
from app.api.stream_caps import CLIENT_CLOSED_REQUEST, HeldKind, unless_disconnected
from app.config import Settings
from app.errors import InvalidOptions
from app.pipeline.sources import ReceivedFile, fetch_url, receive_multipart
from app.records import PublishState, TaskOptions, TaskStatus
from app.result_files import PREVIEW_CONTENT_TYPE, RESULT_FILES
from app.schemas import ErrorBody, LinkCreate, LinkView, TaskCreate, TaskList, TaskView
from app.tasks.events import parse_last_event_id
from app.tasks.service import Created, TaskService

router = APIRouter(prefix="/v1/tasks", tags=["tasks"], dependencies=[ApiKeyDep])
convert_router = APIRouter(prefix="/v1", tags=["tasks"], dependencies=[ApiKeyDep])

TaskId = Annotated[str, Path(description="The task id returned at creation.", max_length=64)]
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


def _options_from_form(fields: dict[str, str]) -> TaskOptions:
    """``options`` as a JSON field, then plain fields (``pages=1-3``) on top of it."""
    merged = _options_json(fields["options"]) if fields.get("options") else {}
    merged.update({k: v for k, v in fields.items() if k in TaskOptions.model_fields and v != ""})
    try:
        return TaskOptions.model_validate(merged)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise InvalidOptions(problems) from exc


def _options_json(text: str) -> dict[str, Any]:
    """The ``options`` form field as a JSON object; ``InvalidOptions`` for anything else."""
    # Checked before parsing: json recurses per level and raises RecursionError on deep input.
    if json_nesting_exceeds(text.encode()):
        raise InvalidOptions(
            f"the 'options' field nests deeper than {MAX_JSON_DEPTH} levels of arrays and objects"
        )
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidOptions(f"the 'options' field is not valid JSON: {exc.msg}") from exc
    except ValueError as exc:  # a number with more digits than int() converts (sys.get_int_max_str_digits)
        raise InvalidOptions(f"the 'options' field cannot be read: {exc}") from exc
    if not isinstance(parsed, dict):
        raise InvalidOptions("the 'options' field must be a JSON object")
    return parsed


async def _receive_upload(
    request: Request, tasks: TaskService, settings: Settings
) -> tuple[ReceivedFile, TaskOptions]:
    """The multipart upload, spooled to disk, and its options; nothing is left behind on refusal."""
    await tasks.ensure_capacity()
    form = await receive_multipart(
        request.headers.get("content-type"),
        request.headers.get("content-length"),
        request.stream(),
        tasks.spool_path(),
        max_bytes=settings.max_upload_bytes,
    )
    try:
        return form.file, _options_from_form(form.fields)
    except BaseException:  # whatever refused the options, the spooled file must not stay behind
        form.file.path.unlink(missing_ok=True)
        raise


def _fetcher(url: str, tasks: TaskService, settings: Settings) -> Callable[[], Awaitable[ReceivedFile]]:
    """Downloads ``url`` when called: after an Idempotency-Key check, which may make it needless."""
    return functools.partial(
        fetch_url,
        url,
        tasks.spool_path(),
        max_bytes=settings.max_upload_bytes,
        allow_private=settings.url_allow_private,
        connect_timeout=settings.url_connect_timeout_seconds,
        read_timeout=settings.url_read_timeout_seconds,
        max_redirects=settings.url_max_redirects,
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
    tasks: TasksDep,
    settings: SettingsDep,
    caller: CallerDep,
    idempotency_key: IdempotencyKey = None,
) -> TaskView:
    """Upload a PDF or image (multipart field ``file``) and queue it for OCR."""
    received, options = await _receive_upload(request, tasks, settings)
    created = await tasks.create_from_upload(received, options, owner=caller, idempotency_key=idempotency_key)
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
    tasks: TasksDep,
    settings: SettingsDep,
    caller: CallerDep,
    idempotency_key: IdempotencyKey = None,
) -> TaskView:
    """Fetch a PDF or image from a URL and queue it for OCR."""
    await tasks.ensure_capacity()
    fetch = _fetcher(str(body.url), tasks, settings)
    created = await tasks.create_from_url(
        str(body.url), body.options, fetch, owner=caller, idempotency_key=idempotency_key
    )
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
        return await tasks.view(await tasks.get(task_id, caller))
    with caps.hold(caller, HeldKind.WAIT):
        record = await unless_disconnected(request.receive, tasks.wait(task_id, owner=caller, seconds=wait))
    if record is None:  # the client left: nobody reads the answer
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return await tasks.view(record)


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


Redirect = Annotated[
    bool,
    Query(
        description="With APP_S3_REDIRECT_DOWNLOADS, false streams the file through the service instead "
        "of a 307 to the bucket (for browsers whose page may not fetch from the bucket's origin).",
    ),
]


async def _result(
    tasks: TaskService,
    task_id: str,
    name: str,
    caller: str | None,
    headers: dict[str, str] | None = None,
    *,
    redirect: bool = True,
) -> Response:
    found = await tasks.download(task_id, name, caller, redirect=redirect)
    if isinstance(found, str):  # APP_S3_REDIRECT_DOWNLOADS: the bucket serves it, the service does not relay
        return RedirectResponse(found, status_code=status.HTTP_307_TEMPORARY_REDIRECT, headers=headers)
    media_type = RESULT_FILES.get(name, "image/png")  # the rest are images/<name>
    return StreamingResponse(stream_file(found), media_type=media_type, headers=headers)


@router.get("/{task_id}/result.md", responses={200: {"content": {"text/markdown": {}}}, **_ERRORS})
async def read_markdown(
    task_id: TaskId, tasks: TasksDep, caller: CallerDep, redirect: Redirect = True
) -> Response:
    """Download the merged Markdown of every page."""
    return await _result(tasks, task_id, "full.md", caller, redirect=redirect)


@router.get("/{task_id}/result.json", responses=_ERRORS)
async def read_result_json(
    task_id: TaskId, tasks: TasksDep, caller: CallerDep, redirect: Redirect = True
) -> Response:
    """Download the task view with every page's Markdown and blocks."""
    return await _result(tasks, task_id, "result.json", caller, redirect=redirect)


@router.get("/{task_id}/layout.json", responses=_ERRORS)
async def read_layout(
    task_id: TaskId, tasks: TasksDep, caller: CallerDep, redirect: Redirect = True
) -> Response:
    """Download the layout: every block's type, pixel box and 0-999 box per page."""
    return await _result(tasks, task_id, "layout.json", caller, redirect=redirect)


@router.get("/{task_id}/images/{name}", responses={200: {"content": {"image/png": {}}}, **_ERRORS})
async def read_image(
    task_id: TaskId,
    name: Annotated[str, Path(max_length=64)],
    tasks: TasksDep,
    caller: CallerDep,
    redirect: Redirect = True,
) -> Response:
    """Download one cropped figure (names as in the task's links)."""
    return await _result(tasks, task_id, f"images/{name}", caller, redirect=redirect)


@router.get("/{task_id}/pages/{number}", responses={200: {"content": {PREVIEW_CONTENT_TYPE: {}}}, **_ERRORS})
async def read_page_preview(
    task_id: TaskId,
    number: Annotated[int, Path(ge=1, le=100_000, description="The page number in the document.")],
    tasks: TasksDep,
    caller: CallerDep,
) -> StreamingResponse:
    """The rendered page as a WebP preview (at most 1600 px a side), as soon as the page is rendered:
    the boxes of ``layout.json`` scale by its size over the page's ``width`` and ``height``."""
    handle = await tasks.open_preview(task_id, number, caller)
    # Rewritten only when a resumed task renders the page again, to the same pixels: cache briefly.
    headers = {"Cache-Control": "private, max-age=300"}
    return StreamingResponse(stream_file(handle), media_type=PREVIEW_CONTENT_TYPE, headers=headers)


async def _owned_task_id(task_id: TaskId, tasks: TasksDep, caller: CallerDep) -> str:
    """The path's task id, once the caller may see that task (404 as for a missing one otherwise)."""
    await tasks.get(task_id, caller)
    return task_id


OwnedTaskId = Annotated[str, Depends(_owned_task_id)]


@router.get("/{task_id}/result.zip", responses={200: {"content": {"application/zip": {}}}, **_ERRORS})
async def read_archive(task_id: OwnedTaskId, downloads: DownloadsDep) -> StreamingResponse:
    """Download full.md, layout.json, result.json and images/ as one zip, streamed as it is built."""
    chunks = await downloads.archive(task_id)
    headers = {"Content-Disposition": f'attachment; filename="{task_id}.zip"'}
    return StreamingResponse(chunks, media_type="application/zip", headers=headers)


@router.post(
    "/{task_id}/publish",
    response_model=PublishState,
    responses={502: {"model": ErrorBody, "description": "the upload failed"}, **_ERRORS},
)
async def publish_task(task_id: OwnedTaskId, followups: FollowUpsDep) -> PublishState:
    """Publish a succeeded task's results (APP_PUBLISH_BACKEND) and return links to them."""
    return await followups.publish(task_id)


@router.post(
    "/{task_id}/links", status_code=status.HTTP_201_CREATED, response_model=LinkView, responses=_ERRORS
)
async def create_link(task_id: OwnedTaskId, body: LinkCreate, downloads: DownloadsDep) -> LinkView:
    """Create a signed, expiring link to one result file that works without an API key."""
    link = await downloads.issue_link(task_id, body.file, body.expires_in)
    return LinkView(file=link.file, url=link.url, expires_at=link.expires_at)


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
    tasks: TasksDep,
    settings: SettingsDep,
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
        created = await _create_any(request, tasks, settings, caller, idempotency_key)
        waiting = tasks.wait(created.record.task_id, owner=caller, seconds=wait)
        record = await unless_disconnected(request.receive, waiting)
    if record is None:  # the client left: the task stays queued, nobody reads the answer
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    headers = {"Idempotent-Replayed": "true"} if created.replayed else None
    if record.status is TaskStatus.SUCCEEDED:
        # Always the body itself: a 307 would send the client's POST on to the bucket.
        return await _result(tasks, record.task_id, "result.json", caller, headers, redirect=False)
    code = status.HTTP_200_OK if record.status.is_final else status.HTTP_202_ACCEPTED
    view = await tasks.view(record)
    return JSONResponse(view.model_dump(mode="json", by_alias=True), code, headers)


async def _create_any(
    request: Request, tasks: TaskService, settings: Settings, caller: str | None, key: str | None
) -> Created:
    """Create from a multipart upload or from a JSON body naming a URL, by the request's type."""
    if request.headers.get("content-type", "").lower().startswith("multipart/"):
        received, options = await _receive_upload(request, tasks, settings)
        return await tasks.create_from_upload(received, options, owner=caller, idempotency_key=key)
    try:
        body = TaskCreate.model_validate_json(await request.body())
    except ValidationError as exc:  # answered as FastAPI answers a bad JSON body: 422 invalid_request
        raise RequestValidationError(exc.errors()) from exc
    await tasks.ensure_capacity()
    fetch = _fetcher(str(body.url), tasks, settings)
    return await tasks.create_from_url(str(body.url), body.options, fetch, owner=caller, idempotency_key=key)
