"""Routes of a task's results under ``/v1/tasks/{id}``: result.md, result.json, layout.json, images,
page previews, the zip, share links and publishing.

Ownership, one rule for every download: ``VisibleTask`` reads the task's record once, for a caller
who may see it (404 as for a missing task otherwise), and every handler hands that record on.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any, BinaryIO

from fastapi import APIRouter, Depends, Path, Query, Request, Response, status
from fastapi.responses import RedirectResponse, StreamingResponse

from app.api.deps import ApiKeyDep, CallerDep, TasksDep
from app.records import PublishState, TaskRecord
from app.result_files import ARCHIVE_TYPE, IMAGE_TYPE, PREVIEW_CONTENT_TYPE, RESULT_FILES
from app.schemas import ErrorBody, LinkCreate, LinkView
from app.storage.archive import CHUNK
from app.tasks.downloads import Downloads
from app.tasks.followups import FollowUps

router = APIRouter(prefix="/v1/tasks", tags=["tasks"], dependencies=[ApiKeyDep])

TaskId = Annotated[str, Path(description="The task id returned at creation.", max_length=64)]
# As documented for every route of /v1/tasks since they shared one router.
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 404, 409, 413, 415, 422, 429, 503)
}


async def get_downloads(request: Request) -> Downloads:  # async: no thread hop (see app.api.deps)
    return request.app.state.downloads


async def get_followups(request: Request) -> FollowUps:
    return request.app.state.followups


async def _visible_task(task_id: TaskId, tasks: TasksDep, caller: CallerDep) -> TaskRecord:
    """The path's task, once the caller may see it (``TaskNotFound``, 404, as for a missing one,
    otherwise): the one read of its record in a download."""
    return await tasks.get(task_id, caller)


DownloadsDep = Annotated[Downloads, Depends(get_downloads)]
FollowUpsDep = Annotated[FollowUps, Depends(get_followups)]
VisibleTask = Annotated[TaskRecord, Depends(_visible_task)]

Redirect = Annotated[
    bool,
    Query(
        description="With APP_S3_REDIRECT_DOWNLOADS, false streams the file through the service instead "
        "of a 307 to the bucket (for browsers whose page may not fetch from the bucket's origin).",
    ),
]


def stream_file(handle: BinaryIO) -> Iterator[bytes]:
    """Chunks of ``handle``, closed at the end; a plain iterator, so Starlette reads it in a thread."""
    with handle:
        while chunk := handle.read(CHUNK):
            yield chunk


async def result_response(
    downloads: Downloads,
    record: TaskRecord,
    name: str,
    headers: dict[str, str] | None = None,
    *,
    redirect: bool = True,
) -> Response:
    """The answer for one result file of ``record`` (a task the caller may see): a 307 to the
    bucket when the store hands out URLs and ``redirect``, else the file streamed with its type.
    Raises ``TaskNotFinished`` before the task succeeded, ``ResultNotFound`` for a file it lacks."""
    found = await downloads.file(record, name, redirect=redirect)
    if isinstance(found, str):  # APP_S3_REDIRECT_DOWNLOADS: the bucket serves it, the service does not relay
        return RedirectResponse(found, status_code=status.HTTP_307_TEMPORARY_REDIRECT, headers=headers)
    media_type = RESULT_FILES.get(name, IMAGE_TYPE)  # the rest are images/<name>
    return StreamingResponse(stream_file(found), media_type=media_type, headers=headers)


@router.get("/{task_id}/result.md", responses={200: {"content": {"text/markdown": {}}}, **_ERRORS})
async def read_markdown(record: VisibleTask, downloads: DownloadsDep, redirect: Redirect = True) -> Response:
    """Download the merged Markdown of every page."""
    return await result_response(downloads, record, "full.md", redirect=redirect)


@router.get("/{task_id}/result.json", responses=_ERRORS)
async def read_result_json(
    record: VisibleTask, downloads: DownloadsDep, redirect: Redirect = True
) -> Response:
    """Download the task view with every page's Markdown and blocks."""
    return await result_response(downloads, record, "result.json", redirect=redirect)


@router.get("/{task_id}/layout.json", responses=_ERRORS)
async def read_layout(record: VisibleTask, downloads: DownloadsDep, redirect: Redirect = True) -> Response:
    """Download the layout: every block's type, pixel box and 0-999 box per page."""
    return await result_response(downloads, record, "layout.json", redirect=redirect)


@router.get("/{task_id}/images/{name}", responses={200: {"content": {"image/png": {}}}, **_ERRORS})
async def read_image(
    record: VisibleTask,
    name: Annotated[str, Path(max_length=64)],
    downloads: DownloadsDep,
    redirect: Redirect = True,
) -> Response:
    """Download one cropped figure (names as in the task's links)."""
    return await result_response(downloads, record, f"images/{name}", redirect=redirect)


@router.get("/{task_id}/pages/{number}", responses={200: {"content": {PREVIEW_CONTENT_TYPE: {}}}, **_ERRORS})
async def read_page_preview(
    record: VisibleTask,
    number: Annotated[int, Path(ge=1, le=100_000, description="The page number in the document.")],
    downloads: DownloadsDep,
) -> StreamingResponse:
    """The rendered page as a WebP preview (at most 1600 px a side), as soon as the page is rendered:
    the boxes of ``layout.json`` scale by its size over the page's ``width`` and ``height``."""
    handle = await downloads.preview(record, number)
    # Rewritten only when a resumed task renders the page again, to the same pixels: cache briefly.
    headers = {"Cache-Control": "private, max-age=300"}
    return StreamingResponse(stream_file(handle), media_type=PREVIEW_CONTENT_TYPE, headers=headers)


@router.get("/{task_id}/result.zip", responses={200: {"content": {ARCHIVE_TYPE: {}}}, **_ERRORS})
async def read_archive(record: VisibleTask, downloads: DownloadsDep) -> StreamingResponse:
    """Download full.md, layout.json, result.json and images/ as one zip, streamed as it is built."""
    chunks = downloads.archive(record)
    headers = {"Content-Disposition": f'attachment; filename="{record.task_id}.zip"'}
    return StreamingResponse(chunks, media_type=ARCHIVE_TYPE, headers=headers)


@router.post(
    "/{task_id}/publish",
    response_model=PublishState,
    responses={502: {"model": ErrorBody, "description": "the upload failed"}, **_ERRORS},
)
async def publish_task(record: VisibleTask, followups: FollowUpsDep) -> PublishState:
    """Publish a succeeded task's results (APP_PUBLISH_BACKEND) and return links to them."""
    return await followups.publish(record.task_id)


@router.post(
    "/{task_id}/links", status_code=status.HTTP_201_CREATED, response_model=LinkView, responses=_ERRORS
)
async def create_link(record: VisibleTask, body: LinkCreate, downloads: DownloadsDep) -> LinkView:
    """Create a signed, expiring link to one result file that works without an API key."""
    link = downloads.issue_link(record, body.file, body.expires_in)
    return LinkView(file=link.file, url=link.url, expires_at=link.expires_at)
