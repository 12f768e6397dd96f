"""Routes of ``/v1/tasks``: create from an upload or a URL, read, cancel, download results."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Annotated, Any, BinaryIO

from fastapi import APIRouter, Path, Request, status
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from app.api.deps import ApiKeyDep, SettingsDep, TasksDep
from app.errors import InvalidOptions
from app.pipeline.sources import fetch_url, receive_multipart
from app.schemas import ErrorBody, TaskCreate, TaskView
from app.storage.local import RESULT_FILES
from app.tasks.model import TaskOptions

router = APIRouter(prefix="/v1/tasks", tags=["tasks"], dependencies=[ApiKeyDep])

TaskId = Annotated[str, Path(description="The task id returned at creation.", max_length=64)]
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 404, 409, 413, 415, 422, 429, 503)
}
_UPLOAD_FORM = {
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
CHUNK = 64 * 1024


def _options_from_form(fields: dict[str, str]) -> TaskOptions:
    """``options`` as a JSON field, then plain fields (``pages=1-3``) on top of it."""
    try:
        merged: dict[str, Any] = json.loads(fields["options"]) if fields.get("options") else {}
        if not isinstance(merged, dict):
            raise InvalidOptions("the 'options' field must be a JSON object")
        merged.update({k: v for k, v in fields.items() if k in TaskOptions.model_fields and v != ""})
        return TaskOptions.model_validate(merged)
    except json.JSONDecodeError as exc:
        raise InvalidOptions(f"the 'options' field is not valid JSON: {exc.msg}") from exc
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise InvalidOptions(problems) from exc


def _stream(handle: BinaryIO) -> Iterator[bytes]:
    # A plain iterator: Starlette runs it in a thread, so reads never block the event loop.
    with handle:
        while chunk := handle.read(CHUNK):
            yield chunk


@router.post(
    "/upload",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=TaskView,
    responses=_ERRORS,
    openapi_extra=_UPLOAD_FORM,
)
async def upload_task(request: Request, tasks: TasksDep, settings: SettingsDep) -> TaskView:
    """Upload a PDF or image (multipart field ``file``) and queue it for OCR."""
    tasks.ensure_capacity()
    form = await receive_multipart(
        request.headers.get("content-type"),
        request.headers.get("content-length"),
        request.stream(),
        tasks.spool_path(),
        max_bytes=settings.max_upload_bytes,
    )
    try:
        options = _options_from_form(form.fields)
    except InvalidOptions:
        form.file.path.unlink(missing_ok=True)
        raise
    return TaskView.from_record(await tasks.submit(form.file, options))


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=TaskView, responses=_ERRORS)
async def create_task(body: TaskCreate, tasks: TasksDep, settings: SettingsDep) -> TaskView:
    """Fetch a PDF or image from a URL and queue it for OCR."""
    tasks.ensure_capacity()
    received = await fetch_url(
        str(body.url),
        tasks.spool_path(),
        max_bytes=settings.max_upload_bytes,
        allow_private=settings.url_allow_private,
        connect_timeout=settings.url_connect_timeout_seconds,
        read_timeout=settings.url_read_timeout_seconds,
        max_redirects=settings.url_max_redirects,
    )
    return TaskView.from_record(await tasks.submit(received, body.options, url=str(body.url)))


@router.get("/{task_id}", response_model=TaskView, responses=_ERRORS)
async def read_task(task_id: TaskId, tasks: TasksDep) -> TaskView:
    """Read a task's status, progress and links."""
    return TaskView.from_record(await tasks.get(task_id))


@router.delete("/{task_id}", response_model=TaskView, responses=_ERRORS)
async def cancel_task(task_id: TaskId, tasks: TasksDep) -> TaskView:
    """Cancel a queued task, or a running one at its next page."""
    return TaskView.from_record(await tasks.cancel(task_id))


async def _result(tasks: TasksDep, task_id: str, name: str, media_type: str) -> StreamingResponse:
    handle = await tasks.open_result(task_id, name)
    return StreamingResponse(_stream(handle), media_type=media_type)


@router.get("/{task_id}/result.md", responses={200: {"content": {"text/markdown": {}}}, **_ERRORS})
async def read_markdown(task_id: TaskId, tasks: TasksDep) -> StreamingResponse:
    """Download the merged Markdown of every page."""
    return await _result(tasks, task_id, "full.md", RESULT_FILES["full.md"])


@router.get("/{task_id}/result.json", responses=_ERRORS)
async def read_result_json(task_id: TaskId, tasks: TasksDep) -> StreamingResponse:
    """Download the task view with every page's Markdown and blocks."""
    return await _result(tasks, task_id, "result.json", RESULT_FILES["result.json"])


@router.get("/{task_id}/layout.json", responses=_ERRORS)
async def read_layout(task_id: TaskId, tasks: TasksDep) -> StreamingResponse:
    """Download the layout: every block's type, pixel box and 0-999 box per page."""
    return await _result(tasks, task_id, "layout.json", RESULT_FILES["layout.json"])


@router.get("/{task_id}/images/{name}", responses={200: {"content": {"image/png": {}}}, **_ERRORS})
async def read_image(
    task_id: TaskId, name: Annotated[str, Path(max_length=64)], tasks: TasksDep
) -> StreamingResponse:
    """Download one cropped figure (names as in the task's links)."""
    return await _result(tasks, task_id, f"images/{name}", "image/png")
